"""Training over slow links: DiLoCo outer loop and quantized averaging of outer gradients."""
