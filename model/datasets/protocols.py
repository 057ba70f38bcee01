"""One dataset under the other evaluation protocol.

The nightly gate scores every model under both published protocols on the same images:
SOP (every test image queries all other test images) and In-Shop (query images search a
separate gallery). A catalogue has one test split, so :func:`as_protocol` derives the other
view deterministically; a real SOP or In-Shop dataset is used under its own protocol as is.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from model.datasets.records import EvalProtocol, ImageRecord, RetrievalDataset


def as_protocol(dataset: RetrievalDataset, protocol: EvalProtocol) -> RetrievalDataset:
    """``dataset`` evaluated under ``protocol``.

    SOP → In-Shop: per test product, the image with the first path (sorted) is the query and
    the others form the gallery; a product with one image stays in the gallery as a
    distractor. In-Shop → SOP: query and gallery together are the test split. Labels keep the
    source split's numbering, so a query and its gallery images share a label.

    Raises:
        ValueError: ``protocol`` is neither ``"sop"`` nor ``"inshop"``.
    """
    if protocol == dataset.protocol:
        return dataset
    if protocol == "inshop":
        query, gallery = _split_queries(dataset.splits["test"])
        splits = {"train": dataset.splits["train"], "query": query, "gallery": gallery}
    elif protocol == "sop":
        splits = {
            "train": dataset.splits["train"],
            "test": [*dataset.splits["query"], *dataset.splits["gallery"]],
        }
    else:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; expected sop or inshop")
    return dataclasses.replace(dataset, splits=splits, protocol=protocol)


def _split_queries(
    records: list[ImageRecord],
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    by_product: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        by_product[record.class_key].append(record)
    query: list[ImageRecord] = []
    gallery: list[ImageRecord] = []
    for key in sorted(by_product):
        images = sorted(by_product[key], key=lambda r: str(r.path))
        if len(images) > 1:
            query.append(images[0])
            gallery.extend(images[1:])
        else:
            gallery.extend(images)
    return query, gallery
