"""The Python API for notebooks: one way to ask each question of a model or a computed run.

    from compute import api
    run = api.open_run("artifacts/shapes-demo")
    run.heads()                                   # one row per analysed head: property, texts, variance
    run.head(5, 3)                                # its texts, property, top and bottom images
    run.neighbours("images/000012.png", 5, 3)     # images this head places nearest to an image
    run.text_neighbours("a red circle", 5, 3)     # ... nearest to a text
    run.property_neighbours(12345, "color")       # nearest by a property's heads
    run.segment(image, "a red circle")            # heatmap over the patch grid
    run.contrast(image, "a circle", "a square")   # where the image speaks for A rather than B
    run.which_heads(image, "a red circle")        # every head's map for the text, ranked by its share
    run.describe(image)                           # the texts the image's head contributions express most
    run.intervene("color")                        # zero-shot accuracy with a property's heads mean-ablated
    run.class_scores(image, run.intervene([(5, 1)]))  # one image's class scores, as is and ablated
    run.neurons(4)                                # MLP neurons of layer 4 by second-order effect, with texts
    run.neuron(4, 333)                            # one neuron: its texts, top images, main head
    run.search_neurons("water")                   # neurons whose effect direction is closest to a text
    run.neuron_map(image, 4, 333)                 # where in the image the neuron's effect comes from
    api.decompose("shapes", [img_a, img_b])       # the Decomposition of a list of images
    api.load("shapes")                            # the model, its preprocessing and tokenizer

An image argument is an image_id of the run, a path (relative to the run's images root, or any file), or a
PIL image. Stored images are answered from the store; others are decomposed live with the run's model, loaded
on first use. Errors are `AtlasError`s with one-line messages. Tables come back as pandas DataFrames.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Union

import numpy as np
import pandas as pd
import torch
from PIL import Image

from compute import checks
from compute.errors import AtlasError
from compute.eval.ablation import HeadScores, accuracy, mean_ablate
from compute.eval.head_search import gap_shares
from compute.headnames import head_name
from compute.images import BadImage, load_image
from compute.maths.decompose import Decomposition, component_layout, resolve_layers
from compute.maths.describe import rank_texts, span_scores
from compute.maths.neurons import SecondOrder
from compute.maths.segment import contrastive, heatmap, which_heads
from compute.models import LoadedModel, load_model
from compute.runtime import pick_device
from compute.store.layout import MANIFEST, RunStore
from compute.store.query import RunInfo, Store, full_path, manifest_summary
from compute.store.readers import iter_chunks
from compute.texts import fill_template, zero_shot_template

if TYPE_CHECKING:
    import pandas as pd

ImageLike = Union[int, str, Path, Image.Image]
MAX_TEXT_CHARS = 300


def load(model_spec: str, device: str = "auto") -> LoadedModel:
    """A model by spec (`clip-atlas models` lists the names), on the GPU when there is one."""
    return load_model(model_spec, pick_device(device))


def _as_pil(image: str | Path | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        return load_image(image)
    except BadImage as e:
        raise AtlasError(f"{image}: not a usable image ({e})") from None


def decompose(model: str | LoadedModel, images: Sequence[str | Path | Image.Image], layers: str = "last4",
              token_layers: str | None = None, batch_size: int = 32) -> Decomposition:
    """The direct-effect decomposition of a list of images (paths or PIL images), on CPU tensors; heads of
    `layers` (lastK | all | L1,L2) and, with `token_layers`, per-token maps of those layers."""
    loaded = load(model) if isinstance(model, str) else model
    if not images:
        raise AtlasError("no images to decompose")
    heads = tuple(resolve_layers(layers, loaded.info.layers))
    tokens = tuple(resolve_layers(token_layers, loaded.info.layers))
    dec = loaded.decomposer(head_layers=heads, token_layers=tokens)
    parts = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([loaded.preprocess(_as_pil(im)) for im in images[i:i + batch_size]]).to(loaded.device)
        parts.append(dec(pixels))
    cat = {f: torch.cat([getattr(p, f) for p in parts]).cpu()
           for f in ("embedding", "embed", "attn", "attn_bias", "mlp", "ln_bias", "heads")}
    tok = torch.cat([p.tokens for p in parts]).cpu() if tokens else None
    pool_mlp = torch.cat([p.pool_mlp for p in parts]).cpu() if parts[0].pool_mlp is not None else None
    return Decomposition(**cat, head_layers=list(heads), token_layers=list(tokens), tokens=tok, pool_mlp=pool_mlp)


def clean_text(text: str | None) -> str:
    """A query text, or AtlasError: non-empty, at most MAX_TEXT_CHARS characters (the tokenizer truncates anyway)."""
    text = " ".join((text or "").split())
    if not text:
        raise AtlasError("enter a text")
    if len(text) > MAX_TEXT_CHARS:
        raise AtlasError(f"the text is {len(text)} characters long; keep it under {MAX_TEXT_CHARS}")
    return text


def open_run(path: str | Path) -> Run:
    """A computed run (a folder with manifest.json), for querying."""
    path = Path(path).resolve()
    if not (path / MANIFEST).is_file():
        raise AtlasError(f"no run at {path} (no {MANIFEST}); compute one with `clip-atlas compute`")
    store = Store(path.parent)
    info = store.run(path.name)
    if not info.ok:
        raise AtlasError(f"run {info.name} cannot be used: {info.problem}")
    return Run(store, info)


@dataclass
class Comparison:
    """Several runs side by side (`compare`)."""
    runs: list[str]
    metrics: pd.DataFrame       # metric, run, value (model-level metrics)
    properties: pd.DataFrame    # run, layer, head, property, confidence
    texts: pd.DataFrame         # run, layer, head, property, texts (list, TextSpan order)
    models: pd.DataFrame | None = None   # one row per run: model, family, pool, images, layers x heads

    def heads_per_property(self) -> pd.DataFrame:
        """property x run: the number of heads labelled with it."""
        return (self.properties.groupby(["property", "run"]).size().unstack("run", fill_value=0)
                .reindex(columns=self.runs, fill_value=0))

    def property_heads(self, prop: str) -> pd.DataFrame:
        """The heads labelled `prop` in every run, with their TextSpan texts."""
        return self.texts[self.texts["property"] == prop].reset_index(drop=True)


def compare(store: str | Path | Store, runs: Sequence[str]) -> Comparison:
    """Runs of one store folder side by side: model-level metrics, property labels, and each labelled head's texts."""
    s = store if isinstance(store, Store) else Store(store)
    twice = sorted({n for n in runs if list(runs).count(n) > 1})
    if twice:
        raise AtlasError(f"run {twice[0]} is named twice; compare different runs")
    infos = [s.run(name) for name in runs]
    for info in infos:
        if not info.ok:
            raise AtlasError(f"run {info.name} cannot be used: {info.problem}")
    metrics = pd.DataFrame([(m, i.name, v) for i in infos for _, _, m, v in s.metrics(i, "model")],
                           columns=["metric", "run", "value"])
    props = pd.DataFrame([(i.name, *r) for i in infos for r in s.properties(i)],
                         columns=["run", "layer", "head", "property", "confidence"])
    rows = []
    for i in infos:
        texts: dict[tuple[int, int], list[str]] = {}
        for t in s.all_head_texts(i):
            texts.setdefault((t.layer, t.head), []).append(t.text)
        rows += [(i.name, r.layer, r.head, r.property, texts.get((r.layer, r.head), [])) for r in s.properties(i)]
    return Comparison(list(runs), metrics, props, pd.DataFrame(rows, columns=["run", "layer", "head", "property", "texts"]),
                      pd.DataFrame([manifest_summary(i) for i in infos]))


@dataclass
class NeuronView:
    """One MLP neuron: its summary row (Store.NEURON_COLUMNS) and the images where its effect is largest."""
    layer: int
    neuron: int
    info: dict
    top: pd.DataFrame         # image_id, path, label, score (the effect norm), file


@dataclass
class Intervention:
    """Zero-shot classification of a run's labelled images with heads mean-ablated (`Run.intervene`)."""
    heads: list[tuple[int, int]]
    classes: list[str]                # the run's labels
    prompts: list[str]
    accuracy: pd.DataFrame          # label ("all images" first), images, base, ablated, change
    image_ids: np.ndarray             # the labelled images, sorted
    base: np.ndarray                  # [N, C] image . prompt
    ablated: np.ndarray               # [N, C] the same with the heads at their mean
    texts: np.ndarray                 # [C, D] prompt embeddings
    head_means: np.ndarray            # [len(heads), C] each ablated head's mean score over the run's images


class StoredScores(NamedTuple):
    """A run's stored vectors scored against texts, rows sorted by image_id."""
    ids: np.ndarray                   # [N]
    base: np.ndarray                  # [N, C] embedding . text
    heads: np.ndarray                 # [len(heads), N, C]
    components: np.ndarray | None     # [N, K, C] (component_layout order), when asked


@dataclass
class MarginGap:
    """Where the gap in zero-shot margin between two labels lives (`Run.margin_gap`)."""
    worse: str
    better: str
    worse_accuracy: float
    better_accuracy: float
    gap: float                        # mean margin of the worse label's images minus the better's
    heads: float                      # share of the gap the attention heads carry (all layers)
    mlp: float                        # share the MLPs carry: no head ablation removes it
    rest: float                       # embedding, biases, norms
    layers: pd.DataFrame              # layer, part (attn, attn_bias, mlp), share
    every_head: pd.DataFrame          # layer, head, share (stored layers), largest share first


@dataclass
class Description:
    """One image in words (`Run.describe`; maths/describe.py): texts ranked overall, and every (head, text) pair."""
    texts: pd.DataFrame             # text, score, heads ("L.H" list, largest first), head_scores
    pairs: pd.DataFrame             # layer, head, property, rank, text, score, share


@dataclass
class HeadView:
    """One head: its label, its TextSpan texts, and the stored images furthest along its first direction."""
    layer: int
    head: int
    property: str | None
    confidence: float | None
    texts: pd.DataFrame       # rank, text, variance_explained, cumulative_variance
    top: pd.DataFrame         # image_id, path, label, score
    bottom: pd.DataFrame


class Run:
    """A computed run: reads go through the query layer (DuckDB over the store); live work uses the run's model."""

    def __init__(self, store: Store, info: RunInfo, model_loader: Callable[[str], LoadedModel] | None = None):
        """`model_loader(spec)` supplies the model (the dashboard passes its process-wide cache); default `load`."""
        self.store, self.info = store, info
        self.manifest: dict = info.manifest or {}
        self._model: LoadedModel | None = None
        self._loader = model_loader or load
        self._second_order: dict = {}

    def __repr__(self) -> str:
        m = self.manifest
        return f"Run({self.info.name!r}: {m.get('model')}, {m.get('image_count')} images, head layers {m.get('head_layers')})"

    @property
    def model(self) -> LoadedModel:
        """The run's model, loaded on first use."""
        if self._model is None:
            self._model = self._loader(self.manifest["model"])
        return self._model

    # ---- tables
    def images(self) -> pd.DataFrame:
        rows = self.store.gallery(self.info, limit=self.store.image_count(self.info))
        df = pd.DataFrame(rows, columns=["image_id", "path", "label"])
        df["file"] = [str(full_path(self.info, p)) for p in df["path"]]
        return df

    def heads(self) -> pd.DataFrame:
        """layer, head, property, confidence, texts (list), variance_explained (of the head, by its texts), stability."""
        labels = {(r.layer, r.head): (r.property, r.confidence) for r in self.store.properties(self.info)}
        summary = {(r.layer, r.head): (r.explained, r.stability) for r in self.store.textspan_summary(self.info)}
        texts: dict[tuple[int, int], list[str]] = {}
        for t in self.store.all_head_texts(self.info):
            texts.setdefault((t.layer, t.head), []).append(t.text)
        rows = []
        for layer in self.manifest.get("head_layers", []):
            for head in range(self.manifest["heads"]):
                p, c = labels.get((layer, head), (None, None))
                e, s = summary.get((layer, head), (None, None))
                rows.append((layer, head, p, c, texts.get((layer, head), []), e, s))
        return pd.DataFrame(rows, columns=["layer", "head", "property", "confidence", "texts",
                                           "variance_explained", "stability"])

    def head(self, layer: int, head: int, k: int = 8) -> HeadView:
        checks.not_negative(k=k)
        self._check_head(layer, head)
        label = {(r.layer, r.head): (r.property, r.confidence)
                 for r in self.store.properties(self.info)}.get((layer, head), (None, None))
        texts = pd.DataFrame(self.store.head_texts(self.info, layer, head),
                             columns=["rank", "text", "variance_explained", "cumulative_variance"])
        direction = self.store.head_direction(self.info, layer, head)
        top = bottom = self._hits([])
        if direction is not None:
            # along the head's first TextSpan direction: ranked by projection (how far an image goes along it)
            top = self._hits(self.store.head_top_k(self.info, layer, head, direction, k=k, by="dot"), by="dot")
            bottom = self._hits(self.store.head_top_k(self.info, layer, head, -direction, k=k, by="dot"), by="dot")
            for col in ("score", "cosine", "dot"):
                bottom[col] = -bottom[col]
        return HeadView(layer, head, label[0], label[1], texts, top, bottom)

    # ---- neighbours
    def neighbours(self, image: ImageLike, layer: int, head: int, k: int = 8) -> pd.DataFrame:
        """Stored images whose contribution through (layer, head) is nearest (dot product) to the image's."""
        checks.not_negative(k=k)
        self._check_head(layer, head)
        image_id, pil = self._resolve(image)
        if image_id is not None:
            query = self.store.stored_head(self.info, image_id, layer, head)
        else:
            query = self._live_heads(pil, (layer,))[0, head]
        return self._hits(self.store.head_top_k(self.info, layer, head, query, k=k, exclude=image_id))

    def text_neighbours(self, text: str, layer: int, head: int, k: int = 8) -> pd.DataFrame:
        """Stored images whose contribution through (layer, head) points most along the text's embedding."""
        checks.not_negative(k=k)
        self._check_head(layer, head)
        query = self.model.encode_texts([clean_text(text)])[0].float().cpu().numpy()
        return self._hits(self.store.head_top_k(self.info, layer, head, query, k=k))

    def property_neighbours(self, image: ImageLike, property: str, k: int = 4) -> pd.DataFrame:
        """Stored images nearest by the mean contribution of the heads labelled `property`."""
        checks.not_negative(k=k)
        names = self.store.property_names(self.info)
        if property not in names:
            raise AtlasError(f"no property vectors for {property!r} in {self.info.name} (have: {', '.join(names) or 'none'};"
                             " `clip-atlas label RUN` writes them)")
        image_id, pil = self._resolve(image)
        if image_id is not None:
            query = self.store.stored_property_vector(self.info, image_id, property)
        else:
            heads = self.store.heads_with_property(self.info, property)
            layers = tuple(sorted({l for l, _ in heads}))
            contrib = self._live_heads(pil, layers)
            query = np.mean([contrib[layers.index(l), h] for l, h in heads], axis=0)
        return self._hits(self.store.property_top_k(self.info, property, query, k=k, exclude=image_id))

    # ---- live maps
    def segment(self, image: ImageLike, text: str, heads: list[tuple[int, int]] | None = None,
                without: list[tuple[int, int]] | None = None) -> np.ndarray:
        """Per patch, the direct contributions of `heads` (all heads of all layers when None), less those of
        `without`, dotted with the text's embedding: [grid_h, grid_w]."""
        if without:
            self._map_layers(without)
        maps = self.model.token_maps(self._pil(image), self._map_layers(heads))
        return heatmap(maps, self.model.encode_texts([clean_text(text)])[0], heads, without)

    def which_heads(self, image: ImageLike, text: str, k: int | None = None) -> list:
        """Every head's map for the text, ranked by its share of the total (maths.segment.HeadShare), top k."""
        checks.not_negative(k=k)
        maps = self.model.token_maps(self._pil(image), self._map_layers(None))
        return which_heads(maps, self.model.encode_texts([clean_text(text)])[0], k)

    # ---- describe and intervene
    def describe(self, image: ImageLike, k: int = 10) -> Description:
        """The texts the image's head contributions express most: each stored head's contribution, centred by
        its mean over the run's images, projected on the head's TextSpan directions (maths/describe.py)."""
        checks.not_negative(k=k)

        picks = self.store.textspan_directions(self.info)
        if not picks:
            raise AtlasError(f"{self.info.name} has no TextSpan texts; `clip-atlas textspan RUN` writes them")
        heads = sorted({(l, h) for l, h, *_ in picks})
        contrib = self._head_contributions(image, heads)
        scores = span_scores(contrib, self.store.head_means(self.info), picks)
        labels = {(r.layer, r.head): r.property for r in self.store.properties(self.info)}
        pairs = pd.DataFrame([(s.layer, s.head, labels.get((s.layer, s.head)), s.rank, s.text, s.score, s.share)
                              for s in sorted(scores, key=lambda s: -s.score)],
                             columns=["layer", "head", "property", "rank", "text", "score", "share"])
        texts = pd.DataFrame([(t.text, t.score, [head_name(l, h) for l, h, _ in t.heads], [p for *_, p in t.heads])
                              for t in rank_texts(scores)[:k]], columns=["text", "score", "heads", "head_scores"])
        return Description(texts, pairs)

    def intervene(self, heads: str | Sequence[tuple[int, int]], template: str | None = None) -> Intervention:
        """Zero-shot accuracy of the run's labelled images (classes: the run's labels in `template`) with `heads`
        (a property's name, or (layer, head) pairs of stored layers) mean-ablated over the run's images. Read from
        the store, no forward pass: see eval/ablation.py for why the scores are e . t - sum (c_h - mu_h) . t."""

        heads = self._ablation_heads(heads)
        template = template or zero_shot_template(self.model.info.architecture)
        labelled, classes = self._labelled("for zero-shot accuracy")
        prompts = fill_template(template, classes)
        T = self.model.encode_texts(prompts).double().cpu().numpy()
        ids, base, per_head, _ = self._stored_scores(heads, T)
        stored_means = self.store.head_means(self.info)
        means = np.stack([stored_means[lh] for lh in heads]) @ T.T if heads else np.zeros((0, len(T)))
        ablated = mean_ablate(base, per_head, means)      # heads at their mean over every image of the run
        want = np.isin(ids, [i for i, _ in labelled])
        label_of = dict(labelled)
        y = np.array([classes.index(label_of[int(i)]) for i in ids[want]])
        b, a = accuracy(base[want], y, y, classes), accuracy(ablated[want], y, y, classes)
        rows = [("all images", int(want.sum()), b["average"], a["average"])]
        rows += [(c, int((y == k).sum()), b["groups"][c], a["groups"][c]) for k, c in enumerate(classes) if c in b["groups"]]
        table = pd.DataFrame(rows, columns=["label", "images", "base", "ablated"])
        table["change"] = table["ablated"] - table["base"]
        return Intervention(heads, classes, prompts, table, ids[want], base[want], ablated[want], T, means)

    def _labelled(self, purpose: str) -> tuple[list[tuple[int, str]], list[str]]:
        """(image_id, label) of every labelled image, and the sorted labels; at least two labels or AtlasError."""
        labelled = [(i, lab) for i, _, lab in self.store.gallery(self.info, limit=self.store.image_count(self.info))
                    if lab is not None]
        classes = sorted({lab for _, lab in labelled})
        if len(classes) < 2:
            raise AtlasError(f"{self.info.name} needs images with at least two labels (labels.csv or subfolders) "
                             f"{purpose}")
        return labelled, classes

    def _stored_scores(self, heads: list[tuple[int, int]], T: np.ndarray, components: bool = False) -> StoredScores:
        """Every stored image's scores against the texts T, sorted by image_id, streamed over the run's chunks:
        memory is classes-wide, not D-wide."""
        ids, base, per, comps = [], [], [], []
        for chunk in iter_chunks(RunStore(self.info.path), heads, components=components):
            ids.append(chunk.ids)
            base.append(chunk.embedding.astype(np.float64) @ T.T)
            per.append(chunk.heads.astype(np.float64) @ T.T if heads else np.zeros((0, len(chunk.ids), len(T))))
            if components:
                comps.append(chunk.components.astype(np.float64) @ T.T)
        ids = np.concatenate(ids)
        order = np.argsort(ids, kind="stable")
        return StoredScores(ids[order], np.concatenate(base)[order], np.concatenate(per, axis=1)[:, order],
                            np.concatenate(comps)[order] if components else None)

    def margin_gap(self, worse: str | None = None, better: str | None = None,
                   template: str | None = None) -> MarginGap:
        """Where the gap between two labels lives: the mean zero-shot margin (the true class's score minus the best
        other class's) of the `worse` label's images minus the `better` label's (default: the labels the model
        classifies worst and best), split over every component of the decomposition and every stored head, from
        the store alone (eval/head_search.py, `gap_shares`). Heads and layers with a large share carry the gap;
        an MLP's share is one no head ablation can remove."""
        template = template or zero_shot_template(self.model.info.architecture)
        labelled, classes = self._labelled("for a margin gap")
        for name, lab in (("worse", worse), ("better", better)):
            if lab is not None and lab not in classes:
                raise AtlasError(f"{name} label {lab!r} is not one of the run's labels")
        T = self.model.encode_texts(fill_template(template, classes)).double().cpu().numpy()
        man = self.info.manifest
        pairs = [(l, h) for l in man["head_layers"] for h in range(man["heads"])]
        sc = self._stored_scores(pairs, T, components=True)
        label_of = dict(labelled)
        rows = np.flatnonzero(np.isin(sc.ids, list(label_of)))
        y = np.array([classes.index(label_of[int(i)]) for i in sc.ids[rows]])
        per = accuracy(sc.base[rows], y, y, classes)["groups"]
        worse = worse or min(per, key=per.get)
        better = better or max(per, key=per.get)
        if worse == better:
            raise AtlasError("pick two different labels to compare")
        L, H = len(man["head_layers"]), man["heads"]
        hs = HeadScores(sc.base, sc.heads.reshape(L, H, *sc.heads.shape[1:]).transpose(2, 0, 1, 3),
                        list(man["head_layers"]), np.arange(len(sc.ids)), torch.from_numpy(T), sc.components,
                        component_layout(man["layers"])[0])
        sh = gap_shares(hs, rows, y, y, classes.index(worse), classes.index(better), top=8)
        layers = pd.DataFrame([(c["layer"], c["kind"], c["share"]) for c in sh["components"] if c["layer"] is not None],
                              columns=["layer", "part", "share"])
        heads = pd.DataFrame([(c["layer"], c["head"], c["share"]) for c in sh["every_head"]],
                             columns=["layer", "head", "share"]).sort_values("share", ascending=False, key=abs)
        return MarginGap(worse, better, per[worse], per[better], sh["gap"], sh["heads"], sh["mlp"], sh["rest"],
                         layers, heads.reset_index(drop=True))

    def class_scores(self, image: ImageLike, intervention: Intervention) -> pd.DataFrame:
        """One image's scores for the intervention's classes: class, base, ablated (image . prompt)."""
        image_id, pil = self._resolve(image)
        if image_id is not None and image_id in set(intervention.image_ids.tolist()):
            row = int(np.searchsorted(intervention.image_ids, image_id))
            base, ablated = intervention.base[row], intervention.ablated[row]
        else:
            layers = sorted({l for l, _ in intervention.heads})
            d = decompose(self.model, [pil if pil is not None else self._pil(image_id)], layers=",".join(map(str, layers))
                          if layers else "last1")
            base = d.embedding[0].double().numpy() @ intervention.texts.T
            parts = np.stack([d.heads[0, layers.index(l), h].double().numpy() @ intervention.texts.T
                              for l, h in intervention.heads]) if intervention.heads else np.zeros((0, len(base)))
            ablated = mean_ablate(base[None], parts[:, None], intervention.head_means)[0]
        return pd.DataFrame({"class": intervention.classes, "base": base, "ablated": ablated})

    def _ablation_heads(self, heads: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        if isinstance(heads, str):
            return self.store.heads_with_property(self.info, heads, required=True)
        out = sorted({(int(l), int(h)) for l, h in heads})
        for l, h in out:
            self._check_head(l, h)
        return out

    def _head_contributions(self, image: ImageLike, heads: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """{(layer, head): [D]} for a stored image (from the store) or any other (decomposed live)."""
        image_id, pil = self._resolve(image)
        if image_id is not None:
            stored = self.store.image_heads(self.info, image_id)
            return {lh: stored[lh] for lh in heads}
        layers = tuple(sorted({l for l, _ in heads}))
        live = self._live_heads(pil, layers)
        return {(l, h): live[layers.index(l), h] for l, h in heads}

    def contrast(self, image: ImageLike, text_a: str, text_b: str,
                 heads: list[tuple[int, int]] | None = None) -> np.ndarray:
        """The map for A minus the map for B: positive where the image speaks for A rather than B."""
        maps = self.model.token_maps(self._pil(image), self._map_layers(heads))
        t = self.model.encode_texts([clean_text(text_a), clean_text(text_b)])
        return contrastive(maps, t[0], t[1], heads)[0]

    # ---- neurons (`clip-atlas neurons`)
    def neurons(self, layer: int | None = None, order: str = "mean_norm", limit: int = 50,
                offset: int = 0) -> pd.DataFrame:
        """The neurons of one MLP layer (the first with a table when None), sorted by `order`: mean_norm,
        max_norm, direction_share, text_share or neuron; `offset` rows skipped (paging)."""
        checks.not_negative(limit=limit, offset=offset)
        layer = self._neuron_layer(layer)
        return pd.DataFrame(self.store.neurons(self.info, layer, order, limit, offset),
                            columns=list(self.store.NEURON_COLUMNS))

    def neuron_count(self, layer: int) -> int:
        return self.store.neuron_count(self.info, self._neuron_layer(layer))

    def neuron(self, layer: int, neuron: int) -> NeuronView:
        rows = self.store.neurons(self.info, self._neuron_layer(layer), ids=[int(neuron)], limit=1)
        if not rows:
            raise AtlasError(f"no neuron {neuron} in layer {layer} of {self.info.name}")
        return NeuronView(layer, int(neuron), rows[0], self._hits(self.store.neuron_top_images(self.info, layer, neuron)))

    def search_neurons(self, text: str, k: int = 10, layer: int | None = None) -> pd.DataFrame:
        """Neurons whose principal effect direction is closest (cosine) to the text's embedding, centred by the
        run's description pool mean when the run has one (every CLIP text shares that component)."""
        checks.not_negative(k=k)
        t = self.model.encode_texts([clean_text(text)])[0].float().cpu().numpy()
        pool = self.store.text_pool(self.info)
        if pool is not None:
            t = t - pool.mean(0)
        t = t / max(float(np.linalg.norm(t)), 1e-12)
        layers = [self._neuron_layer(layer)] if layer is not None else self.store.neuron_layers(self.info)
        if not layers:
            self._neuron_layer(None)                                # raises: the run has no neuron tables
        hits = []
        for l in layers:
            ids, dirs = self.store.neuron_directions(self.info, l)
            scores = dirs @ t
            for j in np.argsort(-scores)[:k]:
                hits.append((l, int(ids[j]), float(scores[j])))
        hits = sorted(hits, key=lambda x: -x[2])[:k]
        info = {}
        for l in {l for l, _, _ in hits}:
            for r in self.store.neurons(self.info, l, ids=[n for ll, n, _ in hits if ll == l], limit=k):
                info[(l, r["neuron"])] = r
        return pd.DataFrame([{**info[(l, n)], "score": s} for l, n, s in hits],
                            columns=list(self.store.NEURON_COLUMNS) + ["score"])

    def neurons_through_head(self, layer: int, head: int, k: int = 10) -> pd.DataFrame:
        """Neurons of earlier layers whose second-order effect flows mainly through head (layer, head)."""
        checks.not_negative(k=k)
        return pd.DataFrame(self.store.neurons_through_head(self.info, layer, head, k),
                            columns=list(self.store.NEURON_COLUMNS))

    def neuron_map(self, image: ImageLike, layer: int, neuron: int, text: str | None = None) -> np.ndarray:
        """[grid_h, grid_w]: per patch, the neuron's second-order effect (through every later head) projected on
        its principal direction, or on a text's embedding when `text` is given. Computed live."""
        layer = self._neuron_layer(layer)
        if text is None:
            ids, dirs = self.store.neuron_directions(self.info, layer)
            where = np.flatnonzero(ids == int(neuron))
            if not len(where):
                raise AtlasError(f"no neuron {neuron} in layer {layer} of {self.info.name}")
            direction = torch.from_numpy(np.array(dirs[where[0]]))
        else:
            direction = self.model.encode_texts([clean_text(text)])[0].float().cpu()
        key = (layer, int(neuron))
        so = self._second_order.get(key)
        if so is None:
            so = SecondOrder(self.model.model, layer, slice(int(neuron), int(neuron) + 1), self.model.decomposer())
            self._second_order = {**dict(list(self._second_order.items())[-7:]), key: so}
        pixels = self.model.preprocess(self._pil(image))[None].to(self.model.device)
        scores = so.token_map(pixels, direction.to(self.model.device))[0, self.model.info.prefix_tokens:]
        return scores.reshape(tuple(self.manifest["patch_grid"])).float().cpu().numpy()

    def _neuron_layer(self, layer: int | None) -> int:
        have = self.store.neuron_layers(self.info)
        if not have:
            raise AtlasError(f"{self.info.name} has no neuron tables; `clip-atlas neurons RUN` writes them")
        if layer is None:
            return have[0]
        if int(layer) not in have:
            raise AtlasError(f"no neuron table for layer {layer} in {self.info.name} (have: {', '.join(map(str, have))})")
        return int(layer)

    # ---- helpers
    def _check_head(self, layer: int, head: int) -> None:
        stored = self.manifest.get("head_layers", [])
        if layer not in stored:
            raise AtlasError(f"layer {layer} is not stored in {self.info.name} (stored: {', '.join(map(str, stored))})")
        if not 0 <= head < self.manifest["heads"]:
            raise AtlasError(f"head {head} is out of range (0-{self.manifest['heads'] - 1})")

    def _map_layers(self, heads: list[tuple[int, int]] | None) -> list[int]:
        n = self.manifest["layers"]
        if heads is None:
            return list(range(n))
        for l, h in heads:
            if not (0 <= l < n and 0 <= h < self.manifest["heads"]):
                raise AtlasError(f"head {l}.{h} is outside a model with {n} layers of {self.manifest['heads']} heads")
        return sorted({l for l, _ in heads})

    def _resolve(self, image: ImageLike) -> tuple[int | None, Image.Image | None]:
        """(image_id, None) for a stored image, (None, PIL image) for any other."""
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            if int(image) not in self.store.image_info(self.info, [int(image)]):
                raise AtlasError(f"no image with id {image} in {self.info.name}")
            return int(image), None
        if isinstance(image, Image.Image):
            return None, image.convert("RGB")
        if isinstance(image, (str, Path)):
            root = Path(self.manifest["images_root"])
            p = Path(image)
            rel = p.resolve().relative_to(root).as_posix() if p.is_absolute() and p.resolve().is_relative_to(root) else p.as_posix()
            found = self.store.image_by_path(self.info, rel)
            if found is not None:
                return found, None
            if p.is_file():
                return None, _as_pil(p)
            raise AtlasError(f"{image}: neither a stored image of {self.info.name} nor a file")
        raise AtlasError(f"an image is an image_id, a path or a PIL image, not {type(image).__name__}")

    def _pil(self, image: ImageLike) -> Image.Image:
        image_id, pil = self._resolve(image)
        if pil is None:
            pil = _as_pil(self.store.image_path(self.info, image_id))
        return pil

    def _live_heads(self, image: Image.Image, layers: tuple[int, ...]) -> np.ndarray:
        """[len(layers), H, D] for one image (layers sorted)."""
        return decompose(self.model, [image], layers=list(layers)).heads[0].float().numpy()

    def _hits(self, hits: list[tuple], by: str = "cosine") -> pd.DataFrame:
        """(image_id, dot[, cosine]) tuples -> image_id, path, label, score (what the rows are ranked by: the cosine,
        or with by="dot" the dot product), cosine (NaN when not a similarity), dot, file."""
        info = self.store.image_info(self.info, [h[0] for h in hits]) if hits else {}
        rows = []
        for h in hits:
            cos = h[2] if len(h) > 2 else float("nan")
            rows.append((h[0], info.get(h[0], (None, None))[0], info.get(h[0], (None, None))[1],
                         cos if by == "cosine" and len(h) > 2 else h[1], cos, h[1]))
        df = pd.DataFrame(rows, columns=["image_id", "path", "label", "score", "cosine", "dot"])
        df["file"] = [str(full_path(self.info, p)) if p else None for p in df["path"]]
        return df
