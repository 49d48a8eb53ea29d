"""Print the resolved versions of the packages mrl and its tests depend on, one line."""

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ["torch", "transformers", "datasets", "accelerate", "scipy", "sentence-transformers", "peft", "tokenizers",
            "huggingface-hub", "numpy", "pyarrow", "xxhash", "safetensors"]


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


print("resolved: " + ", ".join(f"{name} {installed(name)}" for name in PACKAGES))
