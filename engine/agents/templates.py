"""The heuristic agent's library of code changes: small, real search/replace edits against
`models/trainer.py` and `models/siren.py` as they ship.

Each edit's search text is a pair of adjacent lines that the edit itself separates, so a
template stops matching once it is applied (it is skipped at nodes that already have it),
while the other templates' anchors survive (they compose, e.g. clipping on top of a schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.proposal import CodeChange, CodeEdit

TRAINER = "models/trainer.py"
SIREN = "models/siren.py"


@dataclass(frozen=True)
class CodeTemplate:
    """One minimal code change with the prose the protocol asks for."""

    name: str
    file: str
    function: str
    change: str  # one sentence, as analysis.md and the commit message show it
    hypothesis: str
    edits: tuple[CodeEdit, ...]

    @property
    def mutation(self) -> str:
        return f"[code] {self.name}"

    @property
    def code_change(self) -> CodeChange:
        return CodeChange(file=self.file, function=self.function, change=self.change)

    def applies(self, text: str) -> bool:
        """True when every search text occurs exactly once, edit after edit, in `text`."""
        for edit in self.edits:
            if not text or text.count(edit.search) != 1:
                return False
            text = text.replace(edit.search, edit.replace, 1)
        return True

    def apply(self, text: str) -> str:
        """`text` with this template's edits applied (ValueError when it does not apply)."""
        if not self.applies(text):
            raise ValueError(f"template '{self.name}' does not apply to this {self.file}")
        for edit in self.edits:
            text = text.replace(edit.search, edit.replace, 1)
        return text


def _edit(file: str, search: str, replace: str) -> CodeEdit:
    return CodeEdit(file=file, search=search, replace=replace)


COSINE_SCHEDULE = CodeTemplate(
    name="cosine LR schedule",
    file=TRAINER,
    function="train",
    change="Decay the learning rate along a cosine from its configured value to zero over the "
    "training steps",
    hypothesis="A cosine decay lets the late steps settle into the sharp material jumps that a "
    "constant learning rate keeps overshooting, so R2 rises over the parent's.",
    edits=(
        _edit(
            TRAINER,
            "    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)\n"
            "    model.train()\n",
            "    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)\n"
            "    # cosine decay of the learning rate to zero over the run\n"
            "    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, "
            "T_max=settings.steps)\n"
            "    model.train()\n",
        ),
        _edit(
            TRAINER,
            "        optimizer.step()\n        loss_value = loss.item()\n",
            "        optimizer.step()\n        schedule.step()\n        loss_value = loss.item()\n",
        ),
    ),
)

LINEAR_WARMUP = CodeTemplate(
    name="linear warm-up",
    file=TRAINER,
    function="train",
    change="Ramp the learning rate linearly from 10 % to its configured value over the first "
    "5 % of the training steps",
    hypothesis="The first steps at the full learning rate scramble the sine layers' "
    "initialisation; a short warm-up keeps it and R2 rises over the parent's.",
    edits=(
        _edit(
            TRAINER,
            "    model.train()\n    start = time.perf_counter()\n",
            "    model.train()\n"
            "    # linear warm-up: 10 % to 100 % of the learning rate over the first 5 % of steps\n"
            "    warmup = torch.optim.lr_scheduler.LinearLR(\n"
            "        optimizer, start_factor=0.1, total_iters=max(1, settings.steps // 20)\n"
            "    )\n"
            "    start = time.perf_counter()\n",
        ),
        _edit(
            TRAINER,
            "        loss_value = loss.item()\n        report(step, loss_value)\n",
            "        loss_value = loss.item()\n"
            "        warmup.step()\n"
            "        report(step, loss_value)\n",
        ),
    ),
)

GRADIENT_CLIPPING = CodeTemplate(
    name="gradient clipping",
    file=TRAINER,
    function="train",
    change="Clip the gradient norm to 1.0 between the backward pass and the optimiser step",
    hypothesis="The loss spikes come from a few steep batches; clipping their gradients steadies "
    "training and R2 rises over the parent's.",
    edits=(
        _edit(
            TRAINER,
            "        loss.backward()\n        optimizer.step()\n",
            "        loss.backward()\n"
            "        # clip the gradient norm so one steep batch cannot throw the weights off\n"
            "        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)\n"
            "        optimizer.step()\n",
        ),
    ),
)

HUBER_LOSS = CodeTemplate(
    name="Huber loss",
    file=TRAINER,
    function="train",
    change="Replace the squared error by a Huber loss (delta 1.0 on the normalised field)",
    hypothesis="The squared error lets the few particles at material jumps dominate the "
    "gradient; a Huber loss softens them and the bulk fits better, raising R2.",
    edits=(
        _edit(
            TRAINER,
            "        loss = ((prediction - target) ** 2).mean()\n",
            "        # Huber: quadratic near the target, linear beyond delta, so jumps pull less\n"
            "        loss = nn.functional.huber_loss(prediction, target, delta=1.0)\n",
        ),
    ),
)

RESIDUAL_CONNECTION = CodeTemplate(
    name="residual connection",
    file=SIREN,
    function="Siren.forward",
    change="Wrap each hidden sine layer in a residual connection that averages its input and "
    "output",
    hypothesis="Skip connections keep the signal and its gradient alive through the deeper "
    "networks, so deeper configs stop losing R2 to shallower ones.",
    edits=(
        _edit(
            SIREN,
            "    def forward(self, coords: torch.Tensor) -> torch.Tensor:\n"
            "        return self.net(coords)\n",
            "    def forward(self, coords: torch.Tensor) -> torch.Tensor:\n"
            "        x = coords\n"
            "        for layer in self.net:\n"
            "            if isinstance(layer, SineLayer) and not layer.is_first:\n"
            "                # residual: the mean of input and output keeps the activation scale\n"
            "                x = 0.5 * (x + layer(x))\n"
            "            else:\n"
            "                x = layer(x)\n"
            "        return x\n",
        ),
    ),
)

LAYER_NORM = CodeTemplate(
    name="layer norm",
    file=SIREN,
    function="Siren.__init__",
    change="Add a layer normalisation after each hidden sine layer",
    hypothesis="Normalising the hidden activations keeps their spread fixed through depth, so "
    "training is steadier and R2 rises over the parent's.",
    edits=(
        _edit(
            SIREN,
            "                SineLayer(hidden_dim, hidden_dim, omega_0, "
            "learnable_omega=learnable_omega)\n"
            "            )\n"
            "        final_linear = nn.Linear(hidden_dim, out_features)\n",
            "                SineLayer(hidden_dim, hidden_dim, omega_0, "
            "learnable_omega=learnable_omega)\n"
            "            )\n"
            "            # normalise each hidden layer's activations so depth keeps their scale\n"
            "            self.net.append(nn.LayerNorm(hidden_dim))\n"
            "        final_linear = nn.Linear(hidden_dim, out_features)\n",
        ),
    ),
)

# The protocol's list of ideas, in its order.
TEMPLATES: tuple[CodeTemplate, ...] = (
    COSINE_SCHEDULE,
    LINEAR_WARMUP,
    GRADIENT_CLIPPING,
    HUBER_LOSS,
    RESIDUAL_CONNECTION,
    LAYER_NORM,
)


def template_named(name: str) -> CodeTemplate | None:
    """The template called `name` (case-insensitive), or None."""
    wanted = name.strip().lower()
    return next((t for t in TEMPLATES if t.name.lower() == wanted), None)


def template_of(mutation: str) -> CodeTemplate | None:
    """The template a node's mutation text (`[code] <name>`) names, or None."""
    text = mutation.strip()
    if not text.lower().startswith("[code]"):
        return None
    return template_named(text[len("[code]"):])
