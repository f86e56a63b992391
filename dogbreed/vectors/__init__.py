"""The embeddings a scan stores: `similar` (nearest rows by cosine similarity, an index beside the table) and
`relabel` (a model on the same backbone re-decides every row from its vector, no photo opened)."""
