"""greenmim: masked image modeling for hierarchical vision transformers on visible patches only."""
__version__ = "0.1.0"
