"""Search over a version: the FAISS index (choice, build, segments, recall), queries, near-duplicates, thumbnails."""
