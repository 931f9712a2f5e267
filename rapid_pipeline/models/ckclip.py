"""CKCLIP: Chinese CLIP whose text tower takes TransE entity vectors at entity tokens (Rapid Diffusion, sec. 2).

    model = build_ckclip("tiny", vocab_size=len(tok), entity_dim=32)        # from a config, random init
    model = CKCLIPModel.from_pretrained("/path/to/chinese-clip-vit-base-patch16", entity_dim=32)  # local only
    ktok = KnowledgeTokenizer(tokenizer, entity_ids, vectors, names)          # links prompts itself
    batch = ktok(["一张红富士苹果的照片"])                                    # input_ids, attention_mask, entity_*
    text = model.encode_text(batch); image = model.encode_image(pixel_values)  # L2-normalised [B, D]

Knowledge injection (the paper's definition): for every token whose character span lies inside an
entity mention, ``input embedding = word embedding + W · transe(entity)`` with ``W: Linear(De → hidden)``
learned; every other token's input embedding is unchanged. Position and token-type embeddings are added
inside the transformers text model, which receives the sum through ``inputs_embeds``.

Invariants: nothing is ever downloaded (``local_files_only``); saved folders are the transformers
``ChineseCLIPModel`` layout + ``knowledge.safetensors`` (the projection) + ``knowledge.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpoint import load_state_dict, save_state_dict

KNOWLEDGE_JSON = "knowledge.json"
KNOWLEDGE_WEIGHTS = "knowledge.safetensors"
ENTITY_TABLE = "knowledge/entities.parquet"
# Chinese-CLIP / OpenAI CLIP pixel statistics (the checkpoints were trained with them).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class CKCLIPArch:
    text_layers: int
    text_width: int
    text_heads: int
    text_ffn: int
    vision_layers: int
    vision_width: int
    vision_heads: int
    vision_ffn: int
    image_size: int
    patch_size: int
    projection_dim: int
    context_length: int = 32
    max_positions: int = 512


ARCH_PRESETS: dict[str, CKCLIPArch] = {
    "tiny": CKCLIPArch(2, 64, 2, 128, 2, 64, 2, 128, 64, 16, 64, max_positions=64),
    "small": CKCLIPArch(4, 256, 4, 1024, 4, 256, 4, 1024, 128, 16, 256, max_positions=128),
    # Table 6: text tower 12 layers / width 768 / 12 heads / vocab 21128 / context 32; ViT-B/16 @ 224.
    "paper": CKCLIPArch(12, 768, 12, 3072, 12, 768, 12, 3072, 224, 16, 512),
}


def clip_config(preset: str, vocab_size: int):
    """The transformers ``ChineseCLIPConfig`` of an architecture preset."""
    from transformers import ChineseCLIPConfig

    if preset not in ARCH_PRESETS:
        raise ValueError(f"unknown CKCLIP preset {preset!r}; choose one of {', '.join(ARCH_PRESETS)}")
    a = ARCH_PRESETS[preset]
    text = dict(vocab_size=vocab_size, hidden_size=a.text_width, num_hidden_layers=a.text_layers,
                num_attention_heads=a.text_heads, intermediate_size=a.text_ffn, max_position_embeddings=a.max_positions)
    vision = dict(hidden_size=a.vision_width, num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_heads,
                  intermediate_size=a.vision_ffn, image_size=a.image_size, patch_size=a.patch_size,
                  projection_dim=a.projection_dim)
    return ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=a.projection_dim)


# ----------------------------------------------------------------------------------------- text encoder
def _new_projection(entity_dim: int, hidden: int, std: float) -> nn.Linear:
    proj = nn.Linear(entity_dim, hidden)
    # BERT-scale init (std = initializer_range): the injected signal starts on the same scale as the
    # word embeddings, so a pretrained text tower is perturbed, not swamped.
    nn.init.normal_(proj.weight, std=std)
    nn.init.zeros_(proj.bias)
    return proj


class CKCLIPTextEncoder(nn.Module):
    """The knowledge-enhanced text tower (the diffusion model's text encoder).

    ``forward(input_ids, attention_mask, entity_vectors=None, entity_mask=None) -> last_hidden_state [B, L, H]``;
    ``entity_vectors``: float [B, L, De] aligned to tokens, ``entity_mask``: bool [B, L].
    """

    def __init__(self, text_model: nn.Module, knowledge_proj: nn.Linear | None = None):
        super().__init__()
        self.text_model = text_model
        self.knowledge_proj = knowledge_proj

    @property
    def config(self):
        return self.text_model.config

    @property
    def hidden_size(self) -> int:
        return self.text_model.config.hidden_size

    @property
    def entity_dim(self) -> int | None:
        return None if self.knowledge_proj is None else self.knowledge_proj.in_features

    def input_embeddings(self, input_ids: torch.Tensor, entity_vectors: torch.Tensor | None = None,
                         entity_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Word embeddings, plus the projected entity vector at entity tokens (nothing elsewhere)."""
        embeds = self.text_model.embeddings.word_embeddings(input_ids)
        if self.knowledge_proj is None or entity_vectors is None:
            return embeds
        if entity_mask is None:
            entity_mask = entity_vectors.abs().sum(-1) > 0
        injected = self.knowledge_proj(entity_vectors.to(embeds.dtype))
        return embeds + injected * entity_mask.unsqueeze(-1).to(embeds.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                entity_vectors: torch.Tensor | None = None, entity_mask: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.input_embeddings(input_ids, entity_vectors, entity_mask)
        out = self.text_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return out.last_hidden_state

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        self.text_model.save_pretrained(str(folder))
        _save_knowledge(folder, self.knowledge_proj, self.hidden_size)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "CKCLIPTextEncoder":
        """From a text-encoder folder or a whole CKCLIP / Chinese-CLIP folder (its text tower)."""
        from transformers import ChineseCLIPTextModel

        folder = _check_dir(folder)
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") == "chinese_clip":
            return CKCLIPModel.from_pretrained(folder).text_encoder
        text_model = ChineseCLIPTextModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
        return cls(text_model, _load_knowledge(folder, text_model.config.hidden_size,
                                               text_model.config.initializer_range))


def _check_dir(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a local model folder (no config.json); nothing is downloaded")
    return folder


def _save_knowledge(folder: Path, proj: nn.Linear | None, hidden: int) -> None:
    meta = {"knowledge": proj is not None, "entity_dim": None if proj is None else proj.in_features,
            "hidden_size": hidden, "entity_table": ENTITY_TABLE}
    if proj is not None:
        save_state_dict({f"knowledge_proj.{k}": v for k, v in proj.state_dict().items()}, folder / KNOWLEDGE_WEIGHTS)
    (folder / KNOWLEDGE_JSON).write_text(json.dumps(meta, indent=1) + "\n")


def _load_knowledge(folder: Path, hidden: int, std: float, entity_dim: int | None = None,
                    knowledge: bool | None = None) -> nn.Linear | None:
    """The saved projection, or (plain Chinese-CLIP checkpoint) a fresh one when `entity_dim` is given."""
    meta_path = folder / KNOWLEDGE_JSON
    if meta_path.exists() and knowledge is not False:
        meta = json.loads(meta_path.read_text())
        if not meta["knowledge"]:
            return None
        proj = nn.Linear(meta["entity_dim"], hidden)
        sd = load_state_dict(folder / KNOWLEDGE_WEIGHTS)
        proj.load_state_dict({k.removeprefix("knowledge_proj."): v for k, v in sd.items()})
        return proj
    if knowledge is False or entity_dim is None:
        return None
    return _new_projection(entity_dim, hidden, std)


# ----------------------------------------------------------------------------------------- the CLIP model
class CKCLIPModel(nn.Module):
    """Text encoder (with knowledge) + ViT + projections + logit scale; ``forward`` = symmetric InfoNCE."""

    def __init__(self, clip: nn.Module, knowledge_proj: nn.Linear | None = None):
        super().__init__()
        self.clip = clip
        self.knowledge_proj = knowledge_proj
        # A view over the same modules (not registered twice, so state_dict keys stay unique).
        object.__setattr__(self, "_text_encoder", CKCLIPTextEncoder(clip.text_model, knowledge_proj))

    @property
    def text_encoder(self) -> CKCLIPTextEncoder:
        return self._text_encoder

    @property
    def config(self):
        return self.clip.config

    @property
    def knowledge(self) -> bool:
        return self.knowledge_proj is not None

    def encode_text(self, batch: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        hidden = self.text_encoder(batch["input_ids"], batch.get("attention_mask"),
                                   batch.get("entity_vectors"), batch.get("entity_mask"))
        feats = self.clip.text_projection(hidden[:, 0, :])  # [CLS] pooling, as Chinese-CLIP does
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        feats = self.clip.visual_projection(pooled)
        return F.normalize(feats, dim=-1) if normalize else feats

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B_text, B_image] scaled cosine similarities."""
        text, image = self.encode_text(batch), self.encode_image(batch["pixel_values"])
        # Clamp as CLIP does (ln 100): an unbounded temperature makes training unstable.
        scale = self.clip.logit_scale.clamp(max=np.log(100.0)).exp()
        return scale * text @ image.t()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = self.logits(batch)
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        self.clip.save_pretrained(str(folder))
        _save_knowledge(folder, self.knowledge_proj, self.clip.config.text_config.hidden_size)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, entity_dim: int | None = None,
                        knowledge: bool | None = None) -> "CKCLIPModel":
        """A LOCAL Chinese-CLIP (HF layout) or CKCLIP folder; a plain checkpoint gets a fresh projection."""
        from transformers import ChineseCLIPModel

        folder = _check_dir(folder)
        clip = ChineseCLIPModel.from_pretrained(str(folder), local_files_only=True)
        tc = clip.config.text_config
        return cls(clip, _load_knowledge(folder, tc.hidden_size, tc.initializer_range, entity_dim, knowledge))


def build_ckclip(preset: str, vocab_size: int, entity_dim: int, knowledge: bool = True) -> CKCLIPModel:
    """A randomly initialised CKCLIP of an architecture preset (``tiny``/``small``/``paper``)."""
    from transformers import ChineseCLIPModel

    clip = ChineseCLIPModel(clip_config(preset, vocab_size))
    std = clip.config.text_config.initializer_range
    proj = _new_projection(entity_dim, clip.config.text_config.hidden_size, std) if knowledge else None
    return CKCLIPModel(clip, proj)


def count_parameters(model: CKCLIPModel) -> dict[str, int]:
    """Parameters per component (text tower, vision tower, projections, knowledge projection)."""
    def n(m: nn.Module | None) -> int:
        return 0 if m is None else sum(p.numel() for p in m.parameters())

    c = model.clip
    out = {"text_tower": n(c.text_model), "vision_tower": n(c.vision_model),
           "projections": n(c.text_projection) + n(c.visual_projection) + 1, "knowledge_proj": n(model.knowledge_proj)}
    out["total"] = sum(out.values())
    return out


def image_transform(image_size: int):
    """PIL image -> normalised float tensor [3, S, S] (resize shorter side, centre crop)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.ToTensor(), T.Normalize(IMAGE_MEAN, IMAGE_STD)])


# ----------------------------------------------------------------------------------------- knowledge tokenizer
class KnowledgeTokenizer:
    """Tokenizer + entity table (+ linker): text -> ``input_ids``, ``attention_mask``, ``entity_vectors``, ``entity_mask``.

    Mentions come from the caller (shard samples: ``entities`` with code-point ``start``/``end`` and either an
    ``entity_id`` in the table or an explicit vector) or, when none are given, from linking the text with
    `rapid_pipeline.linker.Linker` built over the table's names. A token is an entity token when its character
    span lies inside a mention; it then carries that entity's vector.
    """

    def __init__(self, tokenizer: Any, entity_ids: Sequence[str], vectors: np.ndarray,
                 names: Sequence[Sequence[str]] | None = None, linker: Any = None):
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(entity_ids):
            raise ValueError(f"entity vectors must be [n_entities, dim]; got {vectors.shape} for {len(entity_ids)} ids")
        self.tokenizer, self.entity_ids, self.vectors = tokenizer, list(entity_ids), vectors
        self.names = [list(n) for n in names] if names is not None else [[] for _ in self.entity_ids]
        self.row = {e: i for i, e in enumerate(self.entity_ids)}
        self._linker = linker

    @property
    def entity_dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def linker(self):
        if self._linker is None:
            from ..linker import Linker

            # First name is the canonical one; the rest are simplified forms / aliases.
            entries = [(name, eid, 1.0, "name" if j == 0 else "alias")
                       for eid, names in zip(self.entity_ids, self.names) for j, name in enumerate(names)]
            self._linker = Linker.build(entries)
        return self._linker

    def link(self, text: str) -> list[dict]:
        return [{"entity_id": m.entity_id, "start": m.start, "end": m.end, "surface": m.surface}
                for m in self.linker.link(text)]

    def _mention_vectors(self, mentions: Sequence[Mapping], vectors: np.ndarray | None) -> list[tuple[int, int, np.ndarray]]:
        """(start, end, vector) for every mention that has a vector (an explicit row, else the table's)."""
        out = []
        for i, m in enumerate(mentions):
            vec = None
            if vectors is not None and i < len(vectors) and m.get("emb_row", 0) != -1:
                vec = np.asarray(vectors[i], dtype=np.float32)
            elif m.get("entity_id") in self.row:
                vec = self.vectors[self.row[m["entity_id"]]]
            if vec is not None and np.isfinite(vec).all():
                out.append((int(m["start"]), int(m["end"]), vec))
        return out

    def __call__(self, texts: Sequence[str], max_length: int = 32, entities: Sequence[Sequence[Mapping]] | None = None,
                 entity_vectors: Sequence[np.ndarray | None] | None = None) -> dict[str, torch.Tensor]:
        texts = list(texts)
        enc = self.tokenizer(texts, max_length=max_length, padding="max_length", truncation=True,
                             return_offsets_mapping=True, return_tensors="np")
        vecs = np.zeros((len(texts), max_length, self.entity_dim), dtype=np.float32)
        mask = np.zeros((len(texts), max_length), dtype=bool)
        for b, text in enumerate(texts):
            mentions = entities[b] if entities is not None else self.link(text)
            rows = entity_vectors[b] if entity_vectors is not None else None
            _scatter(enc["offset_mapping"][b], self._mention_vectors(mentions, rows), vecs[b], mask[b])
        return {"input_ids": torch.from_numpy(enc["input_ids"].astype(np.int64)),
                "attention_mask": torch.from_numpy(enc["attention_mask"].astype(np.int64)),
                "entity_vectors": torch.from_numpy(vecs), "entity_mask": torch.from_numpy(mask)}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = Path(folder)
        self.tokenizer.save_pretrained(str(folder))
        (folder / ENTITY_TABLE).parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"entity_id": pa.array(self.entity_ids, pa.string()),
                          "names": pa.array(self.names, pa.list_(pa.string())),
                          "vector": pa.array(list(self.vectors), pa.list_(pa.float32()))})
        pq.write_table(table, folder / ENTITY_TABLE, compression="zstd")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "KnowledgeTokenizer":
        from .char_tokenizer import load_tokenizer

        folder = Path(folder)
        ids, vectors, names = read_entity_table(folder / ENTITY_TABLE)
        return cls(load_tokenizer(folder), ids, vectors, names)


def _scatter(offsets: np.ndarray, spans: Iterable[tuple[int, int, np.ndarray]], vecs: np.ndarray, mask: np.ndarray) -> None:
    for t, (s, e) in enumerate(offsets):
        if e <= s:  # special tokens and padding have empty spans
            continue
        for start, end, vec in spans:
            if start <= s and e <= end:
                vecs[t], mask[t] = vec, True
                break


def read_entity_table(path: str | os.PathLike) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """``knowledge/entities.parquet`` -> (entity ids, vectors [N, De] float32, names per entity)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path).to_pydict()
    vectors = np.asarray(t["vector"], dtype=np.float32)
    if vectors.ndim != 2:
        vectors = vectors.reshape(len(t["entity_id"]), -1)
    return list(t["entity_id"]), vectors, [list(n or []) for n in t["names"]]
