"""The image readers, re-exported from the hospital runtime package :mod:`raycxr_runtime.readers`.

The readers live with the runtime (``deploy/raycxr_runtime``) because a hospital installs that
package alone, without torch or Ray; training imports the very same code from here, so
preprocessing cannot drift between training and inference.
"""

from raycxr_runtime.readers import *  # noqa: F403
from raycxr_runtime.readers import __all__  # noqa: F401
