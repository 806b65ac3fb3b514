"""Pure tensor maths, no files: the decomposition, TextSpan, token heatmaps, saliency baselines, segmentation metrics."""
