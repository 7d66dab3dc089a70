"""`chatops audit serve`: a read-only web page over the audit log.

`reader` opens the database for reading only (SQLite: deferred transactions with `query_only`, so
SQLite's write lock is never taken; PostgreSQL: read-only transactions) and runs the filtered,
paginated queries; `timeline` arranges one run's rows into its phases; `verification` runs and
describes the chain check; `page` holds the running page's state and renders the Jinja2 templates
in `templates/`; `crosssite` keeps other sites out ("Verify now" is a POST with a form token and an
origin check; no background loads from elsewhere); `server` is the aiohttp application (token check,
security headers, pages), `downloads` streams CSV/JSONL, and `serve` runs it for `chatops audit serve`.
"""
