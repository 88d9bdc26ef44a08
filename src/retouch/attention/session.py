"""The attention session: installed controllers, the current step, and the context manager that
installs them.

``attention_control(network, controllers, layout=...)`` installs a
:class:`~retouch.attention.control.ControlProcessor` (a UNet's attention) or a
:class:`~retouch.attention.joint.JointControlProcessor` (SD3's and Flux's joint attention) at
every site some controller selected, and restores the previous processors on exit, errors
included. ``session.denoiser(inner, times)`` wraps a denoiser so each model call tells the
controllers its step and time (:class:`ControlledDenoiser`); ``session.callback`` runs their
per-step latent edits.

References: diffusers ``set_attn_processor``; Hertz et al. 2022 (controllers over attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from retouch.attention.control import Controller, ControlProcessor, StepInfo
from retouch.attention.sites import BatchLayout, Site, describe_sites, find_sites, site_views

__all__ = ["AttentionSession", "ControlledDenoiser", "attention_control", "controlled_network"]


class AttentionSession:
    """Installed controllers, the sites they selected and the current step (see module doc)."""

    def __init__(self, unet: torch.nn.Module, controllers: Sequence[Controller], *,
                 layout: BatchLayout):
        self.unet = unet
        self.layout = layout  # rows of every model call in this session
        self.controllers = list(controllers)
        self.sites = find_sites(unet)  # processor name -> Site
        self.info: StepInfo | None = None  # set by ControlledDenoiser around each model call
        self.calls = {id(c): 0 for c in self.controllers}  # calls each controller acted on
        self._selected = {}
        views = [v for s in self.sites.values() for v in site_views(s)]
        for c in self.controllers:
            chosen = c.bind(views)
            if not chosen and not c.hooks(unet):
                raise ValueError(
                    f"{c.missing_sites_message()}; this model has "
                    f"{describe_sites(self.sites.values())}"
                )
            self._selected[id(c)] = {(s.name, s.kind) for s in chosen}

    def views_at(self, site: Site) -> list[tuple[Controller, Site]]:
        """``(controller, view)`` for each view of ``site`` a controller selected (a joint
        site has two, :func:`~retouch.attention.sites.site_views`)."""
        return [(c, v) for c in self.controllers for v in site_views(site)
                if (v.name, v.kind) in self._selected[id(c)]]

    def controllers_at(self, site: Site) -> list[Controller]:
        return [c for c in self.controllers
                if any((v.name, v.kind) in self._selected[id(c)] for v in site_views(site))]

    def record(self, controller: Controller) -> None:
        self.calls[id(controller)] += 1

    def require_step(self, site: Site | None = None) -> StepInfo:
        if self.info is None:
            where = f" at {site.name}" if site else ""
            raise RuntimeError(
                f"attention controllers ran{where} outside a sampling step: call the model "
                "through session.denoiser(inner, times) so they know the step and time"
            )
        return self.info

    @contextlib.contextmanager
    def at_step(self, step: int, t: float, *, num_steps: int, latent_hw) -> Iterator[StepInfo]:
        """Make ``(step, t)`` the current step for the model calls inside the block."""
        self.info = StepInfo(step, t, num_steps, self.layout, (int(latent_hw[0]),
                                                               int(latent_hw[1])))
        try:
            yield self.info
        finally:
            self.info = None

    def denoiser(self, inner, times) -> ControlledDenoiser:
        """Wrap ``inner`` so each call tells the controllers its step index and time; refuses a
        denoiser whose guidance halves are not the session layout's."""
        from retouch.denoiser import halves_of

        said = getattr(inner, "halves", None)
        if said is not None and tuple(halves_of(inner)) != tuple(self.layout.halves):
            raise ValueError(f"the denoiser stacks its rows as {tuple(said)} but the session's "
                             f"batch layout has halves {self.layout.halves}; build the layout "
                             "with guidance_halves(denoiser)")
        return ControlledDenoiser(inner, self, times)

    def callback(self, ctx) -> Tensor | None:
        """Sampling-loop callback running every controller's :meth:`Controller.after_step`."""
        x = None
        for c in self.controllers:
            out = c.after_step(ctx, self.layout)
            if out is not None:
                ctx.x = x = out
        return x

    def _hook(self, controller: Controller, fn):
        def hook(module, args, output):
            info = self.require_step()
            if not isinstance(output, Tensor) or output.shape[0] != info.layout.size:
                raise ValueError(
                    f"{type(controller).__name__} hooks a module whose output is not a tensor "
                    f"of {info.layout.size} rows (the batch layout {info.layout})"
                )
            if not controller.active(info):
                return None
            self.record(controller)
            return fn(info, output, args)

        return hook

    def check_called(self) -> None:
        idle = [type(c).__name__ for c in self.controllers if self.calls[id(c)] == 0]
        if idle:
            raise RuntimeError(
                f"controller(s) {', '.join(idle)} were installed but never called: the model "
                "did not run through session.denoiser(...), or their steps/sites never occurred"
            )


def controlled_network(model, what: str) -> torch.nn.Module:
    """The network whose attention ``what`` controls: a pipeline model's ``network`` (its UNet,
    or an SD3 / Flux transformer, whose joint attention :mod:`retouch.attention.joint`
    addresses), or a network itself; refuses a missing one (a transformer model's ``unet``)."""
    net = getattr(model, "network", model)
    if net is None:
        raise ValueError(f"{what}: no network given (a transformer model's unet is None: pass "
                         "model.network)")
    return net


class ControlledDenoiser:
    """``denoiser(x, t)`` that sets the session's step from ``t``'s index on the time grid.

    Heun's second evaluation at ``t_{i+1}`` is reported as step ``i + 1``; an evaluation between
    two grid times (RF-Solver's and FireFlow's midpoints) as the step it lies in.
    """

    def __init__(self, inner, session: AttentionSession, times):
        self.inner = inner
        self.schedule = inner.schedule
        self.session = session
        ts = [float(t) for t in (times.tolist() if isinstance(times, Tensor) else times)]
        self.num_steps = len(ts) - 1
        self.times = ts

    def step_of(self, t: float) -> int:
        """The step index of model time ``t``: its grid index, or the step it lies inside."""
        from retouch.samplers import step_at

        step = step_at(self.times, t)
        if step is None:
            raise ValueError(f"time {t} is not on this session's time grid")
        return step

    @property
    def halves(self):
        return getattr(self.inner, "halves", ("cond",))

    def __call__(self, x: Tensor, t: float, **kw) -> Tensor:
        step = self.step_of(float(t))
        with self.session.at_step(step, float(t), num_steps=self.num_steps,
                                  latent_hw=x.shape[-2:]):
            return self.inner(x, t, **kw)


@contextlib.contextmanager
def attention_control(
    unet: torch.nn.Module,
    controllers: Sequence[Controller] = (),
    *,
    layout: BatchLayout,
) -> Iterator[AttentionSession]:
    """Install :class:`ControlProcessor` at the attention modules of ``unet`` that the
    controllers select, for the block.

    The previous processors (and forward hooks of feature controllers) are restored on exit,
    errors included. On a normal exit, a controller that never acted raises RuntimeError.
    ``unet`` may be an SD3 or Flux transformer (joint attention, :mod:`retouch.attention.joint`).
    Raises ValueError at entry if a controller selects no site (naming the model's sites), or
    for a missing network (a transformer model's ``unet``, None).
    """
    from retouch.attention.joint import JointControlProcessor

    unet = controlled_network(unet, "attention controllers")
    session = AttentionSession(unet, controllers, layout=layout)
    previous = dict(unet.attn_processors)
    handles = []
    ok = False
    try:
        installed = dict(previous)
        for key, site in session.sites.items():
            if session.controllers_at(site):
                kind = JointControlProcessor if site.kind == "joint" else ControlProcessor
                installed[key] = kind(site, session, previous[key])
        unet.set_attn_processor(installed)
        for c in session.controllers:
            for name, fn in c.hooks(unet).items():
                try:
                    module = unet.get_submodule(name)
                except AttributeError as exc:
                    raise ValueError(
                        f"{type(c).__name__} hooks module {name!r}, which this model lacks"
                    ) from exc
                handles.append(module.register_forward_hook(session._hook(c, fn)))
        yield session
        ok = True
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(previous)
    if ok:
        session.check_called()
