"""MultimodalClassifier: token embedding -> mmrnn_ext.RNN, LSTM or GRU whose steps see the image -> a head.

Fusion modes (so that users can compare):
    add         image features enter every step's pre-activation (W_img v): the fused kernel's path
    concat      image features concatenated onto every input step
    init        image features projected into the initial state h0 only
    late        image features concatenated with the final text state before the head
    text_only   no image (a baseline)
    image_only  no text: the head sees the image features alone (a baseline)

AttentionDecoder: the attention captioning decoder (one LSTMCell call per step, with gradients) on
mmrnn_ext.LSTMCell or on nn.LSTMCell over the concatenation, for examples/attention_captioning.py and
mmrnn-bench --train-step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import GRU, LSTM, RNN, LSTMCell

FUSIONS = ("add", "concat", "init", "late", "text_only", "image_only")
CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}
FUSION_HELP = {
    "add": "the image in every step's pre-activation (W_img v): the fused kernel's path",
    "concat": "the image concatenated onto every input step",
    "init": "the image projected into the initial state h0",
    "late": "the image concatenated with the final text state, before the head",
    "text_only": "no image (a baseline)",
    "image_only": "no text: the head sees the image alone (a baseline)",
}


class DigitEncoder(nn.Module):
    """A small encoder for the built-in task's 8x8 digits, given as 64 pixel intensities.

    Pixels are standardised with the training split's per-pixel mean and spread (`fit`; buffers,
    saved in the checkpoint) and the output is layer-normalised. Without both, raw [0, 1] pixels
    through a ReLU MLP give image features that are nearly the same vector for every digit at
    initialisation (their per-example spread is ~0.02 against the text's pre-activations), the
    image x statement interaction that decides the label has almost no gradient, and training sits
    at chance on some seeds (1, 2, 5 of 0-5 before this change).

    pixel_noise: the spread of Gaussian noise added to the standardised pixels in training mode
    (0: none; evaluation never adds any). mmrnn-train switches it on once the model has found the
    task (train.loop.PIXEL_NOISE): the encoder otherwise memorises the training digits."""

    def __init__(self, in_dim: int = 64, out_dim: int = 64, pixel_noise: float = 0.0):
        super().__init__()
        self.pixel_noise = pixel_noise
        self.register_buffer("pixel_mean", torch.zeros(in_dim))
        self.register_buffer("pixel_scale", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, out_dim), nn.LayerNorm(out_dim))

    @torch.no_grad()
    def fit(self, pixels):
        """Set the standardisation from training pixels [N, in_dim]; spreads below 0.05 (the corner
        pixels, almost always blank) count as 0.05, so a rare ink there is not blown up."""
        self.pixel_mean.copy_(pixels.mean(0))
        self.pixel_scale.copy_(1 / pixels.std(0).clamp(min=0.05))

    def forward(self, pixels):
        z = (pixels - self.pixel_mean) * self.pixel_scale
        if self.training and self.pixel_noise:
            z = z + self.pixel_noise * torch.randn_like(z)
        return self.net(z)


class MultimodalClassifier(nn.Module):
    """forward(tokens [N, L], lengths [N], image [N, image_dim]) -> logits [N, num_classes].

    cell: "rnn" (tanh), "lstm" or "gru": the recurrent layer (mmrnn_ext.RNN / LSTM / GRU). With
    fusion "init" the image is projected into the initial state: h0 = tanh(P_h v) for every cell,
    and for the LSTM also c0 = P_c v (the cell state is not squashed).
    image_encoder: "digits" (a DigitEncoder trained with the model) or None (the given image
    features are used as they are, e.g. precomputed by any image model)."""

    def __init__(self, vocab_size: int, num_classes: int, image_dim: int, *, embed_dim: int = 32, hidden_size: int = 64,
                 num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0, fusion: str = "add",
                 image_encoder: str | None = None, image_features: int = 64, backend: str = "auto", cell: str = "rnn"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {fusion!r}")
        if cell not in CELLS:
            raise ValueError(f"cell: expected one of {tuple(CELLS)}, got {cell!r}")
        self.cell = cell
        if image_encoder not in (None, "digits"):
            raise ValueError(f"image_encoder: expected None or 'digits', got {image_encoder!r}")
        self.fusion = fusion
        self.encoder = DigitEncoder(image_dim, image_features) if image_encoder == "digits" else None
        feat = image_features if self.encoder is not None else image_dim
        D = 2 if bidirectional else 1
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = None
        if fusion != "image_only":
            in_size = embed_dim + (feat if fusion == "concat" else 0)
            self.rnn = CELLS[cell](in_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0,
                           bidirectional=bidirectional, image_size=feat if fusion == "add" else None, backend=backend)
        if self.rnn is not None:
            self._orthogonal_recurrent_weights()
        if fusion == "init":
            self.init_proj = nn.Linear(feat, (2 if cell == "lstm" else 1) * num_layers * D * hidden_size)
        head_in = {"image_only": feat, "late": 2 * D * hidden_size + feat}.get(fusion, 2 * D * hidden_size)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_in, num_classes))

    @torch.no_grad()
    def _orthogonal_recurrent_weights(self):
        """The classifier's own choice for its encoder (mmrnn_ext.RNN / LSTM / GRU themselves keep
        torch's initialisation): every gate's block of every W_hh orthogonal. torch's U(-1/sqrt(H),
        1/sqrt(H)) gives each block a spectral radius near 1/sqrt(3) ~ 0.58, so what a state carries
        (the image, with fusion "init") and its gradient shrink about 0.58x per step; measured with
        --quick over seeds 0-9, the tanh RNN and the GRU with fusion "init" then sat at chance for
        up to 24 epochs or ended below 0.95 (docs/results.md, "Every cell on every seed"). Orthogonal blocks
        keep the norm."""
        H = self.rnn.hidden_size
        for name, w in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                for k in range(w.shape[0] // H):
                    nn.init.orthogonal_(w[k * H:(k + 1) * H])

    def features(self, image):
        return self.encoder(image) if self.encoder is not None else image

    def forward(self, tokens, lengths, image):
        return self.forward_embedded(self.embed(tokens), lengths, image)

    def forward_embedded(self, x, lengths, image):
        """forward() from token embeddings x [N, L, E] (what attribution methods perturb)."""
        v = self.features(image)
        if self.fusion == "image_only":
            return self.head(v)
        hx, img = None, None
        if self.fusion == "add":
            img = v
        elif self.fusion == "concat":
            x = torch.cat([x, v.unsqueeze(1).expand(-1, x.shape[1], -1)], dim=-1)
        elif self.fusion == "init":
            L, D, H = self.rnn.num_layers, 2 if self.rnn.bidirectional else 1, self.rnn.hidden_size
            states = self.init_proj(v).view(-1, 2 if self.cell == "lstm" else 1, L * D, H).permute(1, 2, 0, 3)
            hx = torch.tanh(states[0]).contiguous()
            if self.cell == "lstm":
                hx = (hx, states[1].contiguous())
        out, h_n = self.rnn(x, hx, image=img, lengths=lengths)
        if self.cell == "lstm":
            h_n = h_n[0]
        D = 2 if self.rnn.bidirectional else 1
        last = h_n[-D:].transpose(0, 1).reshape(x.shape[0], -1)  # last layer, every direction
        mask = (torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        pooled = (out * mask).sum(1) / lengths.clamp(min=1)[:, None].to(out.dtype)  # mean over valid steps
        feats = torch.cat([last, pooled] + ([v] if self.fusion == "late" else []), dim=-1)
        return self.head(feats)


class AttentionDecoder(nn.Module):
    """The "show, attend and tell" captioning decoder: at each step, attention over the image regions
    gives a context vector, and an LSTM cell runs on the word embedding and that context, trained
    with teacher forcing while the batch shrinks as captions end.

    regions [B, R, F] (an image encoder's grid features), captions [B, L] token ids, lengths [B]
    (the number of steps to predict per caption, sorted in decreasing order) -> the loss (mean
    cross-entropy of each next token). cell "mmrnn_ext": mmrnn_ext.LSTMCell(embed, hidden,
    image_size=F) called with image=context; "torch": nn.LSTMCell(embed + F, hidden) on
    torch.cat([embedding, context]) — the same function (copy_from makes the weights equal)."""

    def __init__(self, vocab_size: int, *, embed: int = 512, hidden: int = 512, features: int = 2048,
                 attention: int = 512, cell: str = "mmrnn_ext"):
        super().__init__()
        if cell not in ("mmrnn_ext", "torch"):
            raise ValueError(f"cell: expected 'mmrnn_ext' or 'torch', got {cell!r}")
        self.cell_kind = cell
        self.embed = nn.Embedding(vocab_size, embed)
        self.att_regions = nn.Linear(features, attention)
        self.att_state = nn.Linear(hidden, attention)
        self.att_score = nn.Linear(attention, 1)
        self.init_h, self.init_c = nn.Linear(features, hidden), nn.Linear(features, hidden)
        self.cell = (LSTMCell(embed, hidden, image_size=features) if cell == "mmrnn_ext"
                     else nn.LSTMCell(embed + features, hidden))
        self.out = nn.Linear(hidden, vocab_size)

    @torch.no_grad()
    def copy_from(self, other: "AttentionDecoder") -> "AttentionDecoder":
        """This decoder's weights from `other` (either cell kind): the two compute the same function."""
        mine, theirs = dict(self.named_parameters()), dict(other.named_parameters())
        E = self.embed.embedding_dim
        for name, p in mine.items():
            if name == "cell.weight_img":
                p.copy_(theirs["cell.weight_img"] if "cell.weight_img" in theirs else theirs["cell.weight_ih"][:, E:])
            elif name == "cell.weight_ih" and p.shape != theirs[name].shape:
                p.copy_(theirs[name][:, :E] if "cell.weight_img" not in theirs
                        else torch.cat([theirs[name], theirs["cell.weight_img"]], 1))
            else:
                p.copy_(theirs[name])
        return self

    def forward(self, regions, captions, lengths):
        B = regions.shape[0]
        keys = self.att_regions(regions)  # [B, R, A], once per image
        mean = regions.mean(1)
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        emb = self.embed(captions)
        steps = int(lengths[0])
        total, count = regions.new_zeros(()), 0
        for t in range(steps):
            b = int((lengths > t).sum())  # captions still running (sorted by length)
            h, c = h[:b], c[:b]
            scores = self.att_score(torch.tanh(keys[:b] + self.att_state(h).unsqueeze(1))).squeeze(2)
            context = torch.bmm(torch.softmax(scores, 1).unsqueeze(1), regions[:b]).squeeze(1)  # [b, F]
            if self.cell_kind == "mmrnn_ext":
                h, c = self.cell(emb[:b, t], (h, c), image=context)
            else:
                h, c = self.cell(torch.cat([emb[:b, t], context], 1), (h, c))
            total = total + F.cross_entropy(self.out(h), captions[:b, t + 1], reduction="sum")
            count += b
        return total / max(count, 1)
