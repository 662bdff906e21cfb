"""The import paths of modules that moved when ``lookwhen`` became
subpackages keep working, with a ``FutureWarning`` naming the new path (as
timm kept ``timm.models.layers`` after moving it to ``timm.layers``): code
written against the flat layout imports the module where it lives now, the
same module object, not a copy."""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "lookwhen.baseline": "lookwhen.models.baseline",
    "lookwhen.checkpoint": "lookwhen.io.checkpoint",
    "lookwhen.cli_train": "lookwhen.cli.train",
    "lookwhen.config": "lookwhen.models.config",
    "lookwhen.cpu_inference": "lookwhen.models.cpu_inference",
    "lookwhen.embed": "lookwhen.training.embed",
    "lookwhen.evaluate": "lookwhen.training.evaluate",
    "lookwhen.extractor": "lookwhen.models.extractor",
    "lookwhen.finetune": "lookwhen.training.finetune",
    "lookwhen.flops": "lookwhen.models.flops",
    "lookwhen.layers": "lookwhen.models.layers",
    "lookwhen.lookwhere": "lookwhen.models.lookwhere",
    "lookwhen.losses": "lookwhen.training.losses",
    "lookwhen.model": "lookwhen.models.lookwhen",
    "lookwhen.motion": "lookwhen.data.motion",
    "lookwhen.pretrain": "lookwhen.training.pretrain",
    "lookwhen.rlt": "lookwhen.models.rlt",
    "lookwhen.selector": "lookwhen.models.selector",
    "lookwhen.synthetic": "lookwhen.data.synthetic",
    "lookwhen.teachers": "lookwhen.training.teachers",
    "lookwhen.timm_weights": "lookwhen.models.timm_weights",
    "lookwhen.train": "lookwhen.training.engine",
    "lookwhen.video": "lookwhen.data.video",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old name with the module at its new one."""

    def __init__(self, moved):
        self.moved = dict(moved)
        self.specs = {}

    def find_spec(self, name, path=None, target=None):
        if name not in self.moved:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        new_name = self.moved[spec.name]
        warnings.warn(f"{spec.name} moved to {new_name}: import it from there", FutureWarning, stacklevel=2)
        module = importlib.import_module(new_name)
        self.specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just stamped the old name's spec on the
        # module; it keeps its own (pickling and reloading read it).
        module.__spec__ = self.specs[module.__spec__.name]


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder(MOVED))
