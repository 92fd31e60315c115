"""The CPU backend: a decode step with weight layouts chosen for CPU matrix-vector products and
oneDNN-prepacked weights. The only place in the package that calls private torch ops
(`torch.ops.mkldnn._*`), each guarded by `onednn_works`."""

from .decode import Decoder
from .family import FamilyDecoder
from .onednn import onednn_linear, onednn_packed, onednn_works

__all__ = ["Decoder", "FamilyDecoder", "onednn_linear", "onednn_packed", "onednn_works"]
