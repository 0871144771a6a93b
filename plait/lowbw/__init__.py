"""Training over slow links: the DiLoCo family (DiLoCo, Streaming DiLoCo, CO2) as an outer loop around
the inner optimizer, with quantized averaging of outer gradients between data-parallel workers."""
