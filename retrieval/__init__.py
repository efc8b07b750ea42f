"""Retrieval: files -> embedder -> store rows -> FAISS index -> results."""
