"""Training: the epoch loop, strategies, optimizer and schedule, checkpoints, run folders.

The package is also the API's `imgcls.train(train_dir, out=..., **options)`: `imgcls.train` names this
package as soon as any of its modules is imported, so the package itself is made callable.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from imgcls.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
