"""lowmem-cnn: the book's convolutional networks trained and evaluated under a RAM budget."""

__version__ = "0.1.0"
