"""Pure loss functions, one module per method: tensors in, a NamedTuple of loss and detached stats out."""
