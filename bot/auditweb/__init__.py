"""`chatops audit serve`: a read-only web page over the audit log.

`reader` opens the database for reading only (SQLite: deferred transactions with `query_only`, so
SQLite's write lock is never taken; PostgreSQL: read-only transactions) and runs the filtered,
paginated queries; `timeline` arranges one run's rows into its phases; `verification` keeps the
chain's last verification result; `server` is the aiohttp application (token check, security
headers, pages, CSV/JSONL downloads) rendering the Jinja2 templates in `templates/`.
"""
