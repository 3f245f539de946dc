"""C4 / SlimPajama -> SentencePiece tokens -> packed binary shards -> distributed, resumable loader."""
