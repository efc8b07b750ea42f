"""`vqret serve`: the HTTP API, clip-retrieval's API and the search page, over the query engine.

app.py builds the ASGI app and shapes responses; service.py holds the stores a server answers
from and turns requests into engine queries; clip_compat.py is clip-retrieval's API; web/ is the
page. Nothing here searches by itself: every query runs through vqret.retrieval.engine.
"""
