"""A small backbone for the module-parent tests: `kind = "module"`, module = "tiny_backbone:build" (tests/ is
on sys.path while pytest runs). Named submodules stem, layer1, layer2, pool, head, in that order."""

from torch import nn


class TinyBackbone(nn.Module):
    def __init__(self, num_classes=4, width=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.layer2(self.layer1(self.stem(x)))))


def build(num_classes=4, width=4):
    return TinyBackbone(num_classes, width)


class NeedsValues(TinyBackbone):
    """Reads a value in its forward pass, which torch's meta device cannot give."""

    def forward(self, x):
        if float(x.abs().sum()) < 0:
            raise AssertionError("unreachable")
        return super().forward(x)


def build_needs_values(num_classes=4, width=4):
    return NeedsValues(num_classes, width)


def not_a_module(**kwargs):
    return {"weights": None}
