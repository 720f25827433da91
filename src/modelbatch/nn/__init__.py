"""vmap-friendly layers and the conversion of user models before stacking.

`ModelBatch` substitutes torch layers that `torch.vmap` cannot batch with the
twins below (same parameter names, same math); the twins also work on their
own, like the torch layers they mirror.
"""

from ._cells import GRUCell, LSTMCell, RNNCell
from ._conv import Conv1d, Conv2d, Conv3d, conv_lowering
from ._convert import prepare_models
from ._dropout import (
    AlphaDropout,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    FeatureAlphaDropout,
)
from ._errors import UnbatchableLayerError
from ._rnn import GRU, LSTM, RNN
from ._seeded import (
    SeededAlphaDropout,
    SeededDropout,
    SeededDropout1d,
    SeededDropout2d,
    SeededDropout3d,
    SeededFeatureAlphaDropout,
)
from ._twins import BatchNorm1d, BatchNorm2d, BatchNorm3d, Bilinear, RReLU

__all__ = [
    "AlphaDropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Bilinear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "RNN",
    "RNNCell",
    "RReLU",
    "UnbatchableLayerError",
    "conv_lowering",
    "prepare_models",
    "SeededAlphaDropout",
    "SeededDropout",
    "SeededDropout1d",
    "SeededDropout2d",
    "SeededDropout3d",
    "SeededFeatureAlphaDropout",
]
