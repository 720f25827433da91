"""vmap-friendly layers and the conversion of user models before stacking.

`ModelBatch` substitutes torch layers that `torch.vmap` cannot batch with the
twins below (same parameter names, same math); the twins also work on their
own, like the torch layers they mirror.
"""

from ._convert import prepare_models, restore_config
from ._dropout import (
    AlphaDropout,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    FeatureAlphaDropout,
)
from ._errors import UnbatchableLayerError
from ._norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, RReLU
from ._rnn import GRU, LSTM, RNN, LSTMCell

__all__ = [
    "AlphaDropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
    "GRU",
    "LSTM",
    "LSTMCell",
    "RNN",
    "RReLU",
    "UnbatchableLayerError",
    "prepare_models",
    "restore_config",
]
