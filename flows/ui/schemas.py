"""The API's request bodies and query models. Every text field refuses what
cannot be written as UTF-8 (a lone surrogate such as `"\\ud800"` is valid JSON
but no file, log or response can hold it)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate such as \\ud800)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class SearchOptions(BaseModel):
    k: int = Field(10, ge=1, le=1000, description="Neighbours per key.")
    prefix: Text | None = Field(None, max_length=1024, description="Only return images whose key starts with this.")
    category: Text | None = Field(None, max_length=100, description="Only return images of this category.")
    include_self: bool = Field(False, description="Keep each key's own object in its results.")


class KeyQuery(SearchOptions):
    key: Text = Field(max_length=1024, description="A catalogued key to search from.")


class KeysQuery(SearchOptions):
    keys: list[Annotated[Text, Field(max_length=1024)]] = Field(min_length=1, max_length=1000,
                                                                description="Catalogued keys to search from.")


class LabelIn(BaseModel):
    image_id: str = Field(description="The image's id (as a string: ids are 63-bit).", pattern=r"^\d{1,19}$")
    label: Text = Field(min_length=1, max_length=100)


class LabelsIn(BaseModel):
    labels: list[LabelIn] = Field(min_length=1, max_length=500)
    labeller: Text = Field("anonymous", max_length=100, description="Who labelled (shown in the history).")
