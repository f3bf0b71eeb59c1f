"""Released and pre-trained weights: the restricted torch-pickle reader/writer, the Genesis name maps, transfer into new models and the converter CLI."""
