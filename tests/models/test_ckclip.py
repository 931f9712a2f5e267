"""CKCLIP model, knowledge tokenizer, character vocabulary and retrieval metrics (tiny configs, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rapid_pipeline.models.char_tokenizer import SPECIALS, build_vocab, load_tokenizer
from rapid_pipeline.models.ckclip import (CKCLIPModel, CKCLIPTextEncoder, KnowledgeTokenizer, build_ckclip,
                                          count_parameters)
from rapid_pipeline.retrieval import recall_at_k

CORPUS = ["一张红富士苹果的照片", "桌上的草莓蛋糕", "一只橘猫在草地上", "Apple 手机 2024"]
NAMES = [["红富士苹果", "富士苹果"], ["草莓蛋糕"], ["橘猫"]]


@pytest.fixture
def ktok(tmp_path):
    tok = load_tokenizer(build_vocab(CORPUS, tmp_path / "vocab").parent)
    vectors = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    return KnowledgeTokenizer(tok, ["e_apple", "e_cake", "e_cat"], vectors, NAMES)


def test_vocab_specials_first_and_latin_decomposes(tmp_path):
    path = build_vocab(CORPUS, tmp_path)
    tokens = path.read_text(encoding="utf-8").split()
    assert tuple(tokens[:5]) == SPECIALS
    assert "苹" in tokens and "##苹" not in tokens  # CJK: single tokens, BERT splits them itself
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id == 0 and tok.unk_token_id not in tok("apple 2024")["input_ids"]
    assert build_vocab(CORPUS, tmp_path / "again").read_bytes() == path.read_bytes()  # deterministic


def test_linked_entity_tokens_cover_exactly_the_mention(ktok):
    batch = ktok(["一张红富士苹果的照片", "没有实体"], max_length=16)
    mask = batch["entity_mask"]
    # [CLS] 一 张 红 富 士 苹 果 ...: tokens 3..7 are the mention 红富士苹果
    assert mask[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert not mask[1].any()
    assert torch.allclose(batch["entity_vectors"][0, 3], torch.from_numpy(ktok.vectors[0]))
    assert batch["entity_vectors"][0, ~mask[0]].abs().sum() == 0


def test_given_spans_and_vectors_override_linking(ktok):
    vec = np.full((1, 8), 0.5, np.float32)
    ents = [[{"entity_id": "unknown", "start": 4, "end": 6, "surface": "草地", "emb_row": 3}]]
    batch = ktok(["一只橘猫在草地上"], max_length=12, entities=ents, entity_vectors=[vec])
    assert batch["entity_mask"][0].nonzero().flatten().tolist() == [5, 6]  # chars 4,5 -> tokens 5,6 after [CLS]
    assert torch.allclose(batch["entity_vectors"][0, 5], torch.full((8,), 0.5))
    no_vec = ktok(["一只橘猫在草地上"], max_length=12,
                  entities=[[{"entity_id": "unknown", "start": 4, "end": 6, "surface": "草地", "emb_row": -1}]],
                  entity_vectors=[np.zeros((1, 8), np.float32)])
    assert not no_vec["entity_mask"].any()  # emb_row -1: the entity has no vector, nothing is injected


def test_injection_changes_input_embeddings_only_at_entity_tokens(ktok):
    torch.manual_seed(0)
    model = build_ckclip("tiny", len(ktok), ktok.entity_dim)
    batch = ktok(["一张红富士苹果的照片", "桌上的草莓蛋糕"], max_length=16)
    enc = model.text_encoder
    plain = enc.input_embeddings(batch["input_ids"])
    injected = enc.input_embeddings(batch["input_ids"], batch["entity_vectors"], batch["entity_mask"])
    changed = (plain - injected).abs().sum(-1) > 0
    assert torch.equal(changed, batch["entity_mask"])
    assert batch["entity_mask"].sum() == 5 + 4
    expected = enc.knowledge_proj(batch["entity_vectors"][0, 3])
    assert torch.allclose(injected[0, 3] - plain[0, 3], expected, atol=1e-6)
    enc.eval()
    h_plain = enc(batch["input_ids"], batch["attention_mask"])
    h_kg = enc(batch["input_ids"], batch["attention_mask"], batch["entity_vectors"], batch["entity_mask"])
    assert h_kg.shape == (2, 16, enc.hidden_size) and not torch.allclose(h_plain, h_kg)


def test_no_knowledge_model_ignores_vectors(ktok):
    model = build_ckclip("tiny", len(ktok), ktok.entity_dim, knowledge=False).eval()
    batch = ktok(["一张红富士苹果的照片"], max_length=16)
    with_vec = model.encode_text(batch)
    without = model.encode_text({k: batch[k] for k in ("input_ids", "attention_mask")})
    assert torch.equal(with_vec, without) and model.knowledge_proj is None


def test_contrastive_loss_and_save_load_roundtrip(ktok, tmp_path):
    torch.manual_seed(0)
    model = build_ckclip("tiny", len(ktok), ktok.entity_dim).eval()
    batch = ktok(["一张红富士苹果的照片", "桌上的草莓蛋糕", "一只橘猫在草地上"], max_length=16)
    batch["pixel_values"] = torch.randn(3, 3, 64, 64)
    loss = model(batch)
    assert loss.ndim == 0 and 0 < loss.item() < 5
    model.save_pretrained(tmp_path / "m")
    ktok.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "knowledge" / "entities.parquet").exists()
    again = CKCLIPModel.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(again(batch), loss, atol=1e-6)
    tok2 = KnowledgeTokenizer.from_pretrained(tmp_path / "m")
    batch2 = tok2(["一张富士苹果的照片"], max_length=16)  # an alias from the stored names
    assert batch2["entity_mask"].sum() == 4
    enc = CKCLIPTextEncoder.from_pretrained(tmp_path / "m").eval()
    args = (batch["input_ids"], batch["attention_mask"], batch["entity_vectors"], batch["entity_mask"])
    assert torch.allclose(enc(*args), model.text_encoder(*args), atol=1e-6)
    enc.save_pretrained(tmp_path / "te")
    assert torch.allclose(CKCLIPTextEncoder.from_pretrained(tmp_path / "te").eval()(*args), enc(*args), atol=1e-6)


def test_from_pretrained_refuses_a_non_local_name():
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CKCLIPModel.from_pretrained("OFA-Sys/chinese-clip-vit-base-patch16")


def test_recall_at_k_on_hand_made_matrix():
    # rows = texts, cols = images; the true pair is the diagonal.
    sim = np.array([[0.9, 0.1, 0.2, 0.0],   # text 0: image 0 first           -> rank 0
                    [0.8, 0.5, 0.1, 0.0],   # text 1: image 0 beats image 1     -> rank 1
                    [0.3, 0.4, 0.2, 0.9],   # text 2: three images beat it      -> rank 3
                    [0.0, 0.0, 0.0, 0.1]])  # text 3: rank 0
    r = recall_at_k(sim, ks=(1, 2, 4))
    assert r["t2i_R@1"] == 0.5 and r["t2i_R@2"] == 0.75 and r["t2i_R@4"] == 1.0
    # columns (image -> text): image0 ranks text1? 0.9 vs col [0.9,0.8,0.3,0.0] -> rank 0;
    # image1 col [0.1,0.5,0.4,0.0] -> rank 0; image2 col [0.2,0.1,0.2,0.0] -> tie does not help, rank 0;
    # image3 col [0.0,0.0,0.9,0.1] -> rank 1
    assert r["i2t_R@1"] == 0.75 and r["i2t_R@2"] == 1.0
    assert r["mean_R"] == pytest.approx(np.mean([0.5, 0.75, 1.0, 0.75, 1.0, 1.0]))
    tie = recall_at_k(np.ones((3, 3)), ks=(1,))
    assert tie["t2i_R@1"] == 1.0  # equal scores: nothing scores strictly higher
    with pytest.raises(ValueError, match="square"):
        recall_at_k(np.zeros((2, 3)))


def _bert_text_params(vocab: int, width: int, layers: int, ffn: int, positions: int) -> int:
    emb = (vocab + positions + 2) * width + 2 * width
    layer = 4 * (width * width + width) + 2 * width + (width * ffn + ffn) + (ffn * width + width) + 2 * width
    return emb + layers * layer


def test_print_params_paper_matches_table6():
    from rapid_pipeline import cli

    out = cli.invoke(["train", "clip", "--preset", "paper", "--print-params"])
    arch = out["architecture"]
    assert (arch["text_layers"], arch["text_width"], arch["text_heads"], arch["vocab_size"], arch["context_length"]) \
        == (12, 768, 12, 21128, 32)
    assert (arch["vision_patch"], arch["image_size"]) == (16, 224)
    text = out["parameters"]["text_tower"]
    assert text == _bert_text_params(21128, 768, 12, 3072, 512)
    assert 101e6 < text < 103e6  # RoBERTa-wwm-base sized (~102M)
    assert 85e6 < out["parameters"]["vision_tower"] < 88e6  # ViT-B/16


def test_param_counts_are_per_component(ktok):
    model = build_ckclip("tiny", len(ktok), ktok.entity_dim)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["knowledge_proj"] == ktok.entity_dim * 64 + 64
