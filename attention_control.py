"""What a pipeline asks of self-attention: the row groups of one UNet call, the edits, and the per-call controller.

All three techniques of this project edit the UNet's self-attention *between rows of one batch*:

- Cross-Image Attention: the output rows attend to the appearance rows' keys and values, with contrasted maps;
- Visual Style Prompting: every generated row attends to the reference row's keys and values (per CFG half);
- Free-Prompt-Editing: the target row uses the source row's attention maps on its own values.

A pipeline names the row groups of each UNet call ([`RowGroups`]), says per layer which edits apply at this step
([`KeyValueInjection`], [`AttentionMapInjection`]) and which maps to capture ([`MapCapture`]), and hands all of it
to the [`AttentionController`] once per step. The processor (``attention_processors.py``) reads the controller.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_QUERY_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class RowGroups:
    """The named row groups of one UNet call, in batch order, e.g. ``(("uncond/reference", 1),
    ("uncond/generated", 4), ("cond/reference", 1), ("cond/generated", 4))``.

    Args:
        groups: ``(name, number of rows)`` pairs in batch order; names are unique, counts positive.
    """

    groups: tuple[tuple[str, int], ...]

    def __post_init__(self):
        names = [name for name, _ in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"Row group names must be unique, got {names}.")
        if any(count < 1 for _, count in self.groups):
            raise ValueError(f"Every row group needs at least one row, got {self.groups}.")

    @classmethod
    def of(cls, *groups: tuple[str, int]) -> "RowGroups":
        return cls(tuple((str(name), int(count)) for name, count in groups))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.groups]

    @property
    def total(self) -> int:
        return sum(count for _, count in self.groups)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def rows(self, name: str) -> slice:
        """The batch rows of group ``name``."""
        start = 0
        for group, count in self.groups:
            if group == name:
                return slice(start, start + count)
            start += count
        raise KeyError(f"No row group {name!r} in this call (groups: {self.names}).")

    def stack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One batch from a tensor per group (each with the group's row count, or one row to repeat)."""
        parts = []
        for name, count in self.groups:
            tensor = tensors[name]
            parts.append(tensor.expand(count, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor)
        return torch.cat(parts)

    def split(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows of ``batch`` by group name."""
        return {name: batch[self.rows(name)] for name in self.names}


@dataclass(frozen=True)
class KeyValueInjection:
    """The receiver rows keep their queries and attend to the donor rows' keys and values.

    With ``A = softmax(Q_receiver K_donor^T / sqrt(d))`` the output is ``A' V_donor``, where ``A' = A`` (a fused
    kernel) or, for ``contrast != 1``, Cross-Image Attention's contrasted map ``clip((A - mean) * contrast + mean,
    0, 1)`` (explicit probabilities in query chunks).

    Args:
        receiver: Row group whose attention is edited.
        donor: Row group giving the keys and values: as many rows as the receiver, or one row for all of them.
        contrast: Contrast of the receiver's attention maps (1 = none).
    """

    receiver: str
    donor: str
    contrast: float = 1.0


@dataclass(frozen=True)
class AttentionMapInjection:
    """The receiver rows use the source rows' attention maps on their own values: ``A_source V_receiver``.

    Computed as ``sdpa(Q_source, K_source, V_receiver)`` on a fused kernel, so no map is materialised.

    Args:
        receiver: Row group whose attention is edited.
        source: Row group whose attention maps are used: as many rows as the receiver, or one row for all.
    """

    receiver: str
    source: str


Edit = KeyValueInjection | AttentionMapInjection


@dataclass(frozen=True)
class MapCapture:
    """Record the head-averaged attention maps of some row groups in one layer, `[rows, queries, keys]` float32.

    Args:
        key: Name under which [`AttentionController.captured_maps`] returns the maps.
        groups: Row groups whose maps are recorded, concatenated in this order.
    """

    key: str
    groups: tuple[str, ...]


@dataclass
class AttentionController:
    """Per-call state shared by the processors of the controlled layers; set once per step with [`begin_step`].

    Args:
        query_chunk_size: Query rows per chunk where probabilities are materialised (contrast and capture).
    """

    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE
    row_groups: RowGroups | None = None
    edits: Mapping[str, Sequence[Edit]] = field(default_factory=dict)
    capture: Mapping[str, MapCapture] = field(default_factory=dict)
    _captured: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def begin_step(
        self,
        row_groups: RowGroups,
        edits: Mapping[str, Sequence[Edit]] | None = None,
        capture: Mapping[str, MapCapture] | None = None,
    ) -> None:
        """Describe the next UNet call: its rows, the edits per layer name and the maps to capture per layer name.

        Every edit and capture must name groups of ``row_groups``; a donor or source group has the receiver's row
        count or one row.
        """
        edits, capture = dict(edits or {}), dict(capture or {})
        for layer, layer_edits in edits.items():
            for edit in layer_edits:
                giver = edit.donor if isinstance(edit, KeyValueInjection) else edit.source
                for name in (edit.receiver, giver):
                    if name not in row_groups:
                        raise ValueError(f"Edit {edit} on {layer} names a row group not in {row_groups.names}.")
                receivers, givers = (row_groups.rows(n) for n in (edit.receiver, giver))
                if givers.stop - givers.start not in (1, receivers.stop - receivers.start):
                    raise ValueError(f"Edit {edit}: the giving group needs one row or as many as the receiver.")
        for layer, request in capture.items():
            missing = [name for name in request.groups if name not in row_groups]
            if missing:
                raise ValueError(f"Capture on {layer} names row groups {missing} not in {row_groups.names}.")
        self.row_groups, self.edits, self.capture = row_groups, edits, capture

    def record(self, key: str, maps: torch.Tensor) -> None:
        """Called by a processor with the maps of a [`MapCapture`]."""
        self._captured[key] = maps

    def captured_maps(self) -> dict[str, torch.Tensor]:
        """The maps captured since the last call of this method (then forgotten)."""
        captured, self._captured = self._captured, {}
        return captured
