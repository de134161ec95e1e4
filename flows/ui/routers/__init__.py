"""The page's routes, one module a concern: `pages` (HTML), `search`, `images`
(browse, thumbnails, duplicates), `review` (categories, review queue, labels),
`runs` (run history, failures, the version served)."""
