"""Models: ``factory`` builds them (open_clip configs, our timm ``towers``), ``checkpoint`` is the one
reader and writer of the checkpoint format, ``export`` writes a checkpoint for use without
clipline, ``loss`` is the contrastive loss."""
