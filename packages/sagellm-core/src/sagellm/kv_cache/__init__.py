"""The prefix cache's parts: block keys (``block_hash``), the radix index over cached blocks
(``radix``) and the eviction policies (``eviction`` and one module per policy). The
:class:`~sagellm.engine.block_manager.BlockManager` puts them together."""
