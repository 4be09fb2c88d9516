"""Self-describing model files for the parent and its branches, and the checks that tie them together.

A file holds weights, architecture, and a NodeMeta (branching.models.meta: class names, the parent's
normalisation, the training recipe and seed, the history, and for a branch the fingerprints of the source and
parent it was trained on). Loading uses torch.load(weights_only=True) through Model.load.
"""

from __future__ import annotations

from pathlib import Path

from branching.config.parse import config_from_dict
from branching.config.tree import TreeConfig, node_to_dict
from branching.errors import CheckpointError, ConfigError, MissingPackageError
from branching.models.meta import NodeMeta
from branching.models.model import Model
from branching.models.nets import WHERE


def read_model(path, fix: str) -> Model:
    """One model file, checked against the fingerprint it records; `fix` says what to do otherwise."""
    try:
        model = Model.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{e}; {fix}") from None
    if model.meta is None or model.meta.fingerprint != model.fingerprint():
        raise CheckpointError(f"{path} does not match its recorded fingerprint (corrupt?); {fix}")
    return model


# File names of the original scripts; `run` uses "<node>.pt".
SCRIPT_FILENAMES = {"parent": "parent_2.pt"}


def script_filename(node: str) -> str:
    """models/parent_2.pt, models/fishnet_2.pt, models/flowernet_2.pt, as in the original."""
    return SCRIPT_FILENAMES.get(node, f"{node}net_2.pt")


class ModelStore:
    """A folder of node checkpoints, named "<node>.pt" or, with script_names, as the original scripts did."""

    def __init__(self, directory, script_names: bool = False):
        self.directory = Path(directory)
        self.script_names = script_names

    def path(self, node: str) -> Path:
        return self.directory / (script_filename(node) if self.script_names else f"{node}.pt")

    def save(self, node: str, model: Model, meta: NodeMeta) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(node)
        model.save(path, meta=meta.replace(fingerprint=model.fingerprint()))
        return path

    def load(self, node: str, hint: str = "") -> Model:
        """Load one node's model and check that the file is intact."""
        path = self.path(node)
        if not path.exists():
            raise CheckpointError(f"no model for {node!r} at {path}; train it first{hint}")
        return read_model(path, f"train {node!r} again{hint}")

    def load_tree(self, config, nodes=None, hints: dict | None = None) -> dict[str, Model]:
        """Load the parent and the given branches (default all) with their sources, checking lineage."""
        hints = hints or {}
        wanted = [n.name for n in config.nodes()] if nodes is None else list(nodes)
        needed: list[str] = []
        for name in wanted:
            for link in config.chain(name):
                if link not in needed:
                    needed.append(link)
        models: dict[str, Model] = {}
        for spec in config.nodes():
            if spec.name in needed:
                model = self.load(spec.name, hints.get(spec.name, ""))
                check_node(model, spec, hints.get(spec.name, ""))
                if spec.source is not None:
                    check_lineage(model, spec.name, models[spec.source], models["parent"], hints.get(spec.name, ""))
                models[spec.name] = model
        return models


def check_node(model: Model, spec, hint: str = "", fix: str | None = None) -> None:
    """The file must be of the right kind and hold the classes the config names, in the same order; `fix`
    replaces the advice to train the node again (where the config, not the file, is what to change)."""
    meta = model.meta
    path = meta.path or "?"
    kind = "parent" if spec.source is None else "branch"
    if meta.kind != kind:
        raise CheckpointError(f"{path} holds a {meta.kind!r} model, not the {kind} {spec.name!r}")
    given = spec.net_kind.check_shape(spec.shape_dict)
    if model.kind == spec.kind:  # the files it was built from (weights, a transformer's folder) must be the same
        hashes = [k for k, v in model.shape.items() if k.endswith("sha256") and v and given.get(k) and v != given[k]]
        if hashes:
            key = hashes[0]
            raise CheckpointError(f"{path} was built from {spec.net_kind.files(spec.shape_dict)} with sha256 "
                                  f"{model.shape[key][:16]}..., which now have sha256 {given[key][:16]}...; restore "
                                  f"them, or run the tree again on the new ones{hint}")
        changed = [k for k in model.shape if model.shape[k] != given.get(k)]
        if changed:
            raise CheckpointError(f"{path} holds a {model.kind} parent whose {', '.join(changed)} differ from the "
                                  f"config's ({', '.join(f'{model.shape[k]!r} against {given.get(k)!r}' for k in changed[:2])}"
                                  f"); {fix or 'train it again'}{hint}")
    if (model.kind, model.shape) != (spec.kind, given):
        raise CheckpointError(f"{path} holds a {model.kind} {model.shape or ''}, but the config gives a {spec.kind} "
                              f"{spec.shape_dict or ''} for {spec.name!r}; {fix or 'train it again'}{hint}")
    if list(meta.classes) != list(spec.classes):
        raise CheckpointError(f"{path} was trained on classes {meta.classes}, but the config gives "
                              f"{list(spec.classes)} for {spec.name!r}; {fix or 'train it again'}{hint}")
    recorded = ((meta.tree or {}).get("branches", {}).get(spec.name) if kind == "branch"
                else (meta.tree or {}).get("parent")) or {}
    asked = node_to_dict(spec).get("accept", {})
    if fix and meta.tree and recorded.get("accept", {}) != asked:  # a rule is fitted as the node trains
        raise CheckpointError(f"{path} fitted its acceptance for {recorded.get('accept') or 'the recipe default'}, "
                              f"but the config asks {asked or 'the recipe default'} for {spec.name!r}; a rule is fitted "
                              f"on validation images when the node trains: {fix}{hint}")
    if kind == "branch":
        wanted = (spec.source, spec.layer, spec.where, spec.pool)
        got = meta.read
        if got[3] == "flat" and got[2] not in (None, *WHERE):  # an encoded parent's tap: its where is its pooling
            got, wanted = (*got[:2], None, got[2]), (*wanted[:2], None, spec.pool)
        # where and pool unset in the config: the recipe's and the tap's defaults, whatever they were
        got = tuple(g if w is not None or i < 2 else None for i, (g, w) in enumerate(zip(got, wanted)))
        if wanted != got:
            raise CheckpointError(f"{path} reads (source, layer, where, pool) {got}, but the config says {wanted}; "
                                  f"{fix or f'train {spec.name!r} again'}{hint}")


def check_lineage(branch: Model, name: str, source: Model, parent: Model, hint: str = "") -> None:
    """A branch may only run on the exact source (and parent) it was trained on."""
    meta = branch.meta
    path, tap = meta.path or "?", meta.tap  # tap: its name when trained; the index must still name it
    now = source.tap(meta.layer, meta.where)["name"] if tap is not None else None  # (a module's code may change)
    if tap is not None and now != tap:
        raise CheckpointError(f"branch {name!r} ({path}) was trained on tap {tap!r} of its source, which is now tap "
                              f"{now!r} (the source's module changed); retrain the branch{hint}")
    for role, model, recorded in (("source", source, meta.source_fingerprint),
                                  ("parent", parent, meta.parent_fingerprint)):
        if recorded != model.fingerprint():
            raise CheckpointError(
                f"branch {name!r} ({path}) was trained on a different {role} ({recorded}) than "
                f"{(model.meta and model.meta.path) or role} ({model.fingerprint()}); retrain the branch{hint}")


def load_folder(models_dir, config: TreeConfig | None = None, asked: str = "--models ") -> tuple[TreeConfig,
                                                                                             dict[str, Model]]:
    """Every node model in a folder, keyed by the name recorded in it, and the tree they form (`asked`: how the
    folder was given, for messages: a flag, or nothing from Python).

    Without a config the tree is rebuilt from what each file records (classes, source, layer);
    with one, the files must match it. Either way each branch must sit on the exact models it was
    trained on.
    """
    directory = Path(models_dir)
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise CheckpointError(f"{asked}{models_dir} {what}; pass the folder of a run (its OUT, e.g. runs/latest), "
                              f"its models/ folder or an exported .onnx tree")
    if not any(directory.glob("*.pt")) and any((directory / "models").glob("*.pt")):
        directory = directory / "models"
    files = sorted(p for p in directory.glob("*.pt") if not p.name.endswith(".selfeval.pt"))  # judges: branching.judge
    if not files:
        raise CheckpointError(f"no model files (*.pt) in {models_dir}; pass the models folder of a run "
                              f"(e.g. runs/latest/models)")
    models: dict[str, Model] = {}
    for path in files:
        model = read_model(path, f"remove it from {directory} or train it again")
        if not isinstance(model.meta, NodeMeta):
            raise CheckpointError(f"{path} records no tree node; it was not written by branching run")
        name = model.meta.name
        if name in models:
            raise CheckpointError(f"{path} and {models[name].meta.path} both hold node {name!r}; keep one")
        models[name] = model
    fix = None
    if config is None:
        config = _recorded_tree(models, directory) or _config_from_models(models, directory)
    else:
        fix = "leave out --config to use the tree the models record, or train this tree"
    for spec in config.nodes():
        if spec.name not in models:
            hint = (f"; {fix}" if fix else "; train it, or pass the folder of a complete run")
            raise CheckpointError(f"no model for node {spec.name!r} in {directory}, but the tree "
                                  f"{', '.join(n.name for n in config.nodes())} needs it{hint}")
        check_node(models[spec.name], spec, fix=fix)
        if spec.source is not None:
            check_lineage(models[spec.name], spec.name, models[spec.source], models["parent"])
    return config, {spec.name: models[spec.name] for spec in config.nodes()}


def _recorded_tree(models: dict[str, Model], directory) -> TreeConfig | None:
    """The tree the models were trained as, recorded in each of them (None for files written before)."""
    recorded = {name: m.meta.tree for name, m in models.items() if m.meta.tree is not None}
    if not recorded:
        return None
    trees = {name: {k: v for k, v in tree.items() if k != "path"} for name, tree in recorded.items()}
    first = next(iter(trees))
    other = next((name for name, tree in trees.items() if tree != trees[first]), None)
    if other is not None:
        raise CheckpointError(f"the models {first!r} and {other!r} in {directory} were trained as different trees; "
                              f"keep the models of one run per folder")
    try:
        return config_from_dict(recorded[first])
    except MissingPackageError:  # not the files' fault: the message names what to install
        raise
    except ConfigError as e:
        raise CheckpointError(f"{models[first].meta.path} records an invalid tree ({e})") from None


def _config_from_models(models: dict[str, Model], directory) -> TreeConfig:
    if "parent" not in models:
        raise CheckpointError(f"no parent model in {directory}; train the parent first")
    tree: dict = {"parent": None, "branches": {}, "path": str(directory)}
    for name, model in models.items():
        meta = model.meta
        node = {"classes": list(meta.classes)}
        if not model.net_kind.fingerprinted():  # an MLP: its layers are its architecture
            node.update(hidden=list(model.architecture[1:-1]), activation=model.activation)
        else:
            node.update(kind=model.kind, **model.shape)
        if name == "parent":
            tree["parent"] = node
        else:
            tree["branches"][name] = {"from": meta.source, "layer": meta.layer, "where": meta.where,
                                      "pool": meta.pool, **node}
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise CheckpointError(f"the models in {directory} do not form a valid tree ({e})") from None
