# A two-layer MLP trained with hand-written Adam on plain Arrays (no Flux), checkpointed every
# SAVE_EVERY steps through a dsd checkpoint manager (synchronous and asynchronous saves), then
# resumed by a fresh trainer with other weights and another learning rate, which must end up
# with bitwise the trained weights, Adam moments, step counters and learning rates.
#
#   DSD_LIBRARY=build/capi/libdsd.so julia --project=bindings/julia \
#       bindings/julia/examples/train_mlp.jl [CHECKPOINT_DIR]
#
# Layout. PyTorch's nn.Linear(in, out).weight is an (out, in) row-major tensor, which has the
# bytes of a Julia (in, out) column-major matrix (the column-major rule: Julia size (a, b) is
# PyTorch shape (b, a)). So each weight is a Julia (in, out) matrix used as transpose(W), a
# lazy view: the checkpoint holds exactly what nn.Linear loads, and nothing is copied.
#
# tests/julia/train_mlp_sequence.c performs the C ABI calls this program makes, in order
# (its comments name the blocks below); the suite `julia` runs it against the library.

using Dsd
using LinearAlgebra: transpose

const N_IN, N_HIDDEN, N_OUT = 4, 8, 2
const BATCH = 16
const STEPS = 20
const SAVE_EVERY = 5

mutable struct Param
    name::String
    w::Array{Float32}
    m::Array{Float32}       # Adam's exp_avg
    v::Array{Float32}       # Adam's exp_avg_sq
    step::Array{Float32,0}  # PyTorch's 0-dimensional `step` tensor
end
Param(name, w) = Param(name, w, zero(w), zero(w), fill(0.0f0))

mutable struct Trainer
    params::Vector{Param}
    model::Dsd.Model
    opt::Dsd.Optimizer
    groups::Vector{Dsd.StateDict}  # hyperparameters, shared with dsd: loads update them
    lr::Vector{Float64}            # the learning rates this trainer uses, read from groups
end

# Deterministic values, so two runs save the same bytes.
init(dims, seed) = reshape(Float32.(0.5 .* sin.(seed .* (1:prod(dims)) .+ 0.1)), dims)

# [block B: tensors, model, optimizer, param groups, state]
function Trainer(comm, seed; lr = 1e-2)
    ps = [Param("fc1.weight", init((N_IN, N_HIDDEN), seed)),   # PyTorch (8, 4)
          Param("fc1.bias", init((N_HIDDEN,), seed + 1)),       # PyTorch (8,)
          Param("fc2.weight", init((N_HIDDEN, N_OUT), seed + 2)), # PyTorch (2, 8)
          Param("fc2.bias", init((N_OUT,), seed + 3))]          # PyTorch (2,)
    model = Dsd.Model(comm, (p.name => p.w for p in ps)...; class_name = "MLP")
    opt = Dsd.Optimizer(model)
    g1 = Dsd.add_param_group!(opt, ["fc1.weight", "fc1.bias"];
        lr = lr, betas = (0.9, 0.999), eps = 1e-8, weight_decay = 0.0)
    g2 = Dsd.add_param_group!(opt, ["fc2.weight", "fc2.bias"];
        lr = lr / 2, betas = (0.9, 0.999), eps = 1e-8, weight_decay = 0.0)
    for p in ps
        Dsd.set_param_state!(opt, p.name, "step" => p.step, "exp_avg" => p.m, "exp_avg_sq" => p.v)
    end
    return Trainer(ps, model, opt, [g1, g2], [lr, lr / 2])
end

# [block F: hyperparameters read back after a load]
sync_hyper!(t::Trainer) = (t.lr .= [g["lr"] for g in t.groups]; t)

# [block G: teardown] the optimizer, then the model (which releases its tensor handles).
function Base.close(t::Trainer)
    close(t.opt)
    close(t.model)
end

# Loss 0.5 * mean over the batch of |out - y|^2, and its gradients (same shapes as the params).
function gradients(t::Trainer, x, y)
    W1, b1, W2, b2 = (p.w for p in t.params)
    h = transpose(W1) * x .+ b1            # (N_HIDDEN, BATCH)
    a = max.(h, 0.0f0)
    out = transpose(W2) * a .+ b2          # (N_OUT, BATCH)
    d_out = (out .- y) ./ Float32(BATCH)
    d_h = (W2 * d_out) .* (h .> 0)
    grads = [x * transpose(d_h), vec(sum(d_h; dims = 2)), a * transpose(d_out), vec(sum(d_out; dims = 2))]
    return grads, 0.5f0 * sum(abs2, out .- y) / BATCH
end

function adam_step!(t::Trainer, grads; beta1 = 0.9, beta2 = 0.999, eps = 1e-8)
    for (i, (p, g)) in enumerate(zip(t.params, grads))
        lr = t.lr[i <= 2 ? 1 : 2]
        p.step[] += 1
        bc1, bc2 = 1 - beta1^p.step[], 1 - beta2^p.step[]
        @. p.m = beta1 * p.m + (1 - beta1) * g
        @. p.v = beta2 * p.v + (1 - beta2) * g * g
        @. p.w -= lr * (p.m / bc1) / (sqrt(p.v / bc2) + eps)
    end
end

# [block C: state dict get] {"model": ..., "optim": ...}, aliasing the trainer's arrays.
function state_of(t::Trainer)
    msd, osd = Dsd.get_state_dict(t.model, t.opt)
    state = Dsd.StateDict("model" => msd, "optim" => osd)
    close(msd)  # the tree keeps its own references
    close(osd)
    return state
end

bitwise(a::AbstractArray{Float32}, b::AbstractArray{Float32}) =
    reinterpret(UInt32, vec(a)) == reinterpret(UInt32, vec(b))

function same_state(a::Trainer, b::Trainer)
    all(bitwise(p.w, q.w) && bitwise(p.m, q.m) && bitwise(p.v, q.v) && p.step[] === q.step[]
        for (p, q) in zip(a.params, b.params)) && a.lr == b.lr
end

function main(root)
    x, y = init((N_IN, BATCH), 7), init((N_OUT, BATCH), 11)
    ok = false
    # [block A: communicator] from the launcher's variables, or one rank without a launcher
    Dsd.Communicator() do comm
        Dsd.CheckpointManager(comm, root; keep_last = 2) do mgr
            a = Trainer(comm, 1)
            for step in 1:STEPS
                grads, loss = gradients(a, x, y)
                adam_step!(a, grads)
                step % SAVE_EVERY == 0 || continue
                # [block D: manager saves] every other save asynchronous
                state = state_of(a)
                if step % (2 * SAVE_EVERY) == 0
                    future = Dsd.save_async(mgr, state, step)  # returns once staged
                    wait(future)  # polls dsd_future_wait(f, 0), yielding to other tasks
                    close(future)
                else
                    Dsd.save(mgr, state, step)
                end
                close(state)
                Dsd.rank(comm) == 0 && println("step $(step): loss $(loss), saved to $(root)")
            end

            # [block E: resume] a fresh trainer loads the newest checkpoint, in place
            b = Trainer(comm, 2; lr = 0.5)
            state = state_of(b)
            resumed = Dsd.load_latest!(mgr, state)
            msd, osd = state["model"], state["optim"]
            Dsd.set_state_dict(b.model, b.opt; model_state_dict = msd, optim_state_dict = osd)
            close(msd)
            close(osd)
            close(state)
            sync_hyper!(b)  # [block F]

            ok = resumed == STEPS && same_state(a, b)
            println("resumed at step $(resumed): ", ok ? "bitwise the trained state" : "DIFFERENT")
            close(a)  # [block G]
            close(b)
        end
    end
    # Every array lent to dsd was given back when its last reference went (no GC involved).
    Dsd.pinned_count() == 0 || error("dsd still refers to $(Dsd.pinned_count()) arrays")
    return ok
end

if abspath(PROGRAM_FILE) == @__FILE__
    root = isempty(ARGS) ? mktempdir() : ARGS[1]
    exit(main(root) ? 0 : 1)
end
