"""Device kernels on visible tokens: group window attention (layouts, bias, SDPA / FlexAttention) and sparse convolutions."""
