"""The layer types a config can name ([[network.layers]] type = ...), by their kind.

A new layer is a class in a module of its own that answers everything about itself
(see layers.Layer), and one entry here.
"""

from lowmem_cnn.engine.average_pooling import AveragePooling
from lowmem_cnn.engine.global_average_pooling import GlobalAveragePooling
from lowmem_cnn.engine.layers import Affine, BatchNormalization, Convolution, Dropout, MaxPooling, ReLU

LAYER_TYPES = {cls.kind: cls for cls in (Convolution, ReLU, MaxPooling, AveragePooling,
                                         GlobalAveragePooling, Affine, Dropout, BatchNormalization)}
