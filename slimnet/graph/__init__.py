"""Channel groups (see ``analysis``): this step only moves the module into a package."""

from slimnet.graph.analysis import *  # noqa: F403
from slimnet.graph.analysis import (  # noqa: F401
    COMPUTE_OPS, NORM_TYPES, SHAPE_ONLY_OUTPUTS, ChannelGraph, ChannelGroup, TraceError, _as_batch_of_two,
    _meta_shapes, _trace, trace_channel_groups,
)
