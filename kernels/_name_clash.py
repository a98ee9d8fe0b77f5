"""Hugging Face's ``kernels`` distribution has our import name; warn, once at import, where both are installed.

transformers >= 5.25 requires Hugging Face's ``kernels``: installing it puts a second ``kernels``
package beside ours, and whichever is found first shadows the other. With ours first, transformers
(which sees the Hugging Face distribution's version) imports its hub-kernels names from our package
and fails with an ImportError when it builds a model. The only fix is to keep one of the two.
"""
import importlib.metadata
import warnings

HUB_DISTRIBUTION = "kernels"  # ours is distributed as energy-moe


def warn_if_hub_kernels_installed() -> None:
    try:
        hub_version = importlib.metadata.version(HUB_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return
    warnings.warn(f"Hugging Face's `kernels` {hub_version} is installed beside energy-moe, whose import name is also "
                  "`kernels`: one shadows the other, and transformers then fails to import its hub-kernels "
                  "integration. Uninstall it (`pip uninstall kernels`) and use transformers < 5.25, which does not "
                  "require it.", RuntimeWarning, stacklevel=2)
