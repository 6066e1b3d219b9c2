"""
    Dsd

Distributed state dicts and checkpoints for Julia trainers: PyTorch-compatible, sharded,
resharding checkpoints of your own `Array`s and `CuArray`s, through dsd's C ABI.

Two layers, kept apart:
- `Dsd.LibDsd` (src/LibDsd.jl) is generated from the C header by tools/gen_julia.py: every
  constant, struct and function of `dsd_decls.h`, one `@ccall` each, nothing else.
- this module is the Julia API above it. It never calls C itself: only LibDsd's functions.

# The column-major rule

dsd speaks PyTorch's shapes, which are row-major. A Julia array is column-major, so it is
handed over **without copying** as the PyTorch tensor with the dimensions (and strides)
reversed: a Julia array of `size(A) == (a, b)` is the PyTorch tensor of shape `(b, a)`, with
the same bytes. `torch_shape(A)` says which shape PyTorch will see.

So a Julia weight matrix `W` of size `(out, in)` is PyTorch's `(in, out)`. To produce
checkpoints that `torch.nn.Linear` loads directly, keep the weight as a Julia `(in, out)`
matrix (PyTorch's `(out, in)`) and use the lazy `transpose(W) * x` in the forward pass: no
`permutedims`, no copy, and every byte of the checkpoint is PyTorch's `Linear.weight`.

# Ownership

Roots (`Communicator`, `Model`, `Optimizer`, `StateDict`, `AsyncCheckpointer`,
`CheckpointManager`, `SaveFuture`) have finalizers **and** `close`; prefer `close` or the
do-block forms (`Dsd.Communicator() do comm ... end`), since a finalizer runs at an
unspecified time (and `close` of a checkpointer waits for its save in flight). Arrays handed
to dsd are pinned in a global table until dsd's release callback says it let go of them
(which may be after `close` of the handle: a state dict or model may still hold them).
"""
module Dsd

using Libdl
using Preferences
import DLPack

include("LibDsd.jl")
const L = LibDsd

export DsdError, Communicator, Tensor, StateDict, Model, Optimizer, AsyncCheckpointer,
    CheckpointManager, SaveFuture, Bytes, Mesh, Layout, Shard, Replicate
export torch_shape, torch_strides, rank, world_size, barrier
export get_model_state_dict, set_model_state_dict, get_optimizer_state_dict,
    set_optimizer_state_dict, get_state_dict, set_state_dict
export checkpoint_save, checkpoint_save_async, checkpoint_load, checkpoint_load_full,
    checkpoint_verify, latest_step, load_latest!
export add_parameter!, add_buffer!, add_param_group!, set_param_state!, param_state,
    param_group, set_materialize!

# ----------------------------------------------------------------------------------------
# The library

"""
    library_path()

Where libdsd is loaded from: `ENV["DSD_LIBRARY"]`, else the `libdsd` preference (set it once
with `Dsd.set_library_preference!(path)`), else the soname `libdsd.so.<major>` found by the
system loader.
"""
function library_path()
    path = get(ENV, "DSD_LIBRARY", "")
    isempty(path) || return path
    path = @load_preference("libdsd", "")
    isempty(path) || return path
    return "libdsd.so.$(L.DSD_ABI_VERSION_MAJOR)"
end

"Records `path` as this project's libdsd (a LocalPreferences.toml entry)."
set_library_preference!(path::AbstractString) = @set_preferences!("libdsd" => String(path))

const RELEASE_CALLBACK = Ref{Ptr{Cvoid}}(C_NULL)
const MATERIALIZE_CALLBACK = Ref{Ptr{Cvoid}}(C_NULL)

function __init__()
    path = library_path()
    Libdl.dlopen(path, Libdl.RTLD_NOW | Libdl.RTLD_GLOBAL)  # throws, naming the path
    L.set_library!(path)
    version = L.dsd_abi_version()
    major, minor = Int(version >> 16), Int(version & 0xffff)
    if major != L.DSD_ABI_VERSION_MAJOR
        throw(DsdError(L.DSD_E_ABI_MISMATCH, "abi_mismatch",
            "$(path) implements the dsd ABI $(major).$(minor); this binding was generated " *
            "for $(L.DSD_ABI_VERSION_MAJOR).$(L.DSD_ABI_VERSION_MINOR)", path))
    end
    # Pointers to Julia functions are made at load time, not precompile time.
    RELEASE_CALLBACK[] = @cfunction(_release_pinned, Cvoid, (Ptr{Cvoid},))
    MATERIALIZE_CALLBACK[] = @cfunction(_materialize, Int32,
        (Ptr{Cvoid}, Ptr{L.dsd_optim}, Ptr{L.dsd_tensor}, Ptr{Csize_t}, Csize_t))
    return nothing
end

"The library's version string (\"0.3.0\")."
version() = _string(L.dsd_version_string())

# ----------------------------------------------------------------------------------------
# Errors

"""
    DsdError(code, name, message, context)

A failed dsd call: `code` is a `LibDsd.DSD_E_*` status, `name` its stable name
(`"not_found"`), `message` one sentence naming the key, tensor or file, `context` that key or
file ("" when there is none).
"""
struct DsdError <: Exception
    code::Int32
    name::String
    message::String
    context::String
end

function Base.showerror(io::IO, e::DsdError)
    print(io, "DsdError(", e.name, "): ", e.message)
    isempty(e.context) || print(io, " [", e.context, "]")
end

_string(s::Cstring) = Ptr{Cchar}(s) == C_NULL ? "" : unsafe_string(s)

# Turns a failed status and its error object into a DsdError, freeing the object.
function _take_error(status::Integer, err::Ptr{L.dsd_error})
    if err == C_NULL
        name = _string(L.dsd_status_name(status))
        return DsdError(status, name, "dsd call failed: $(name)", "")
    end
    try
        code = L.dsd_error_code(err)
        return DsdError(code, _string(L.dsd_status_name(code)), _string(L.dsd_error_message(err)),
            _string(L.dsd_error_context(err)))
    finally
        L.dsd_error_free(err)
    end
end

# Calls a fallible LibDsd function with a fresh NULL `dsd_error*` (the ABI requires *err to
# be NULL on entry) and throws its error. Returns the status (DSD_OK, or one listed in `ok`).
function checked(f::F, args...; ok::Tuple = ()) where {F}
    err = Ref{Ptr{L.dsd_error}}(C_NULL)
    status = f(args..., err)
    status == L.DSD_OK && return status
    if status in ok
        err[] == C_NULL || L.dsd_error_free(err[])
        return status
    end
    throw(_take_error(status, err[]))
end

_closed(what) = throw(ArgumentError("$(what) is closed"))

# ----------------------------------------------------------------------------------------
# Pinned memory: arrays dsd refers to stay alive until its release callback runs.

# Keyed by the integer passed to dsd as `user_data`. The release callback may run on any
# thread (the one that drops the last reference: an asynchronous save's background thread,
# a finalizer), so the table is guarded by a spin lock, with finalizers held off on this
# thread while it is taken (a finalizer that frees a model calls back into the table).
const PINNED = IdDict{UInt,Any}()
const PINNED_LOCK = Threads.SpinLock()
const NEXT_PIN = Threads.Atomic{UInt}(0)

function _locked(f)
    GC.enable_finalizers(false)
    lock(PINNED_LOCK)
    try
        return f()
    finally
        unlock(PINNED_LOCK)
        GC.enable_finalizers(true)
    end
end

function _pin(x)::UInt
    key = Threads.atomic_add!(NEXT_PIN, UInt(1)) + UInt(1)
    _locked(() -> (PINNED[key] = x))
    return key
end

function _release_pinned(user_data::Ptr{Cvoid})::Cvoid
    key = UInt(user_data)
    _locked(() -> delete!(PINNED, key))
    return nothing
end

"The number of arrays dsd still refers to (0 once every object referring to them is gone)."
pinned_count() = _locked(() -> length(PINNED))

# ----------------------------------------------------------------------------------------
# Tensors

const DTYPES = IdDict{DataType,Int32}(
    Bool => L.DSD_DTYPE_BOOL, UInt8 => L.DSD_DTYPE_U8, Int8 => L.DSD_DTYPE_I8,
    Int16 => L.DSD_DTYPE_I16, Int32 => L.DSD_DTYPE_I32, Int64 => L.DSD_DTYPE_I64,
    Float16 => L.DSD_DTYPE_F16, Float32 => L.DSD_DTYPE_F32, Float64 => L.DSD_DTYPE_F64,
    ComplexF32 => L.DSD_DTYPE_C64, ComplexF64 => L.DSD_DTYPE_C128, UInt16 => L.DSD_DTYPE_U16,
    UInt32 => L.DSD_DTYPE_U32, UInt64 => L.DSD_DTYPE_U64)
const JULIA_TYPES = Dict{Int32,DataType}(v => k for (k, v) in DTYPES)

function dtype(::Type{T}) where {T}
    code = get(DTYPES, T, nothing)
    code === nothing && throw(ArgumentError("dsd has no dtype for Julia's $(T)"))
    return code
end

"""
    torch_shape(A)

The shape PyTorch sees for the Julia array `A` handed to dsd: `reverse(size(A))` (see the
column-major rule in the module documentation).
"""
torch_shape(A::AbstractArray) = reverse(size(A))

"The strides (in elements) PyTorch sees for `A`: `reverse(strides(A))`."
torch_strides(A::AbstractArray) = reverse(strides(A))

"The Julia `size` of an array holding a PyTorch tensor of shape `shape` without copying."
julia_size(shape) = Tuple(reverse(Tuple(shape)))

"""
    Tensor

A dsd tensor handle. `Tensor(A)` wraps the memory of a strided Julia array (CPU `Array`s and
views here, `CuArray`s with CUDA loaded) without copying, with PyTorch shape `torch_shape(A)`;
the array stays pinned until dsd lets go of it. `close(t)` releases this handle (dsd's other
references live on).
"""
mutable struct Tensor
    handle::L.dsd_tensor
    array::Any  # the Julia array the handle aliases; `nothing` for memory dsd owns
    function Tensor(handle::L.dsd_tensor, array)
        t = new(handle, array)
        finalizer(_release!, t)
        return t
    end
end

# (pointer, device) of an array's memory; DsdCUDAExt adds CuArrays.
_blob(A::StridedArray) = (Ptr{Cvoid}(pointer(A)), L.dsd_device(L.DSD_DEVICE_CPU, 0))
_blob(A::AbstractArray) =
    throw(ArgumentError("dsd takes strided arrays (Array, strided views, CuArray); got $(typeof(A))"))

function Tensor(A::AbstractArray{T}; read_only::Bool = false) where {T}
    data, device = _blob(A)
    code = dtype(T)
    shape = Int64[torch_shape(A)...]
    strides = Int64[torch_strides(A)...]
    key = _pin(A)  # unpinned by dsd's release callback, also when the call below fails
    out = Ref(L.dsd_tensor(0))
    checked(L.dsd_tensor_from_blob, data, code, shape, Csize_t(ndims(A)), strides, device,
        read_only, RELEASE_CALLBACK[], Ptr{Cvoid}(key), out)
    return Tensor(out[], A)
end

"""
    Dsd.tensor_from_dlpack(A)

The same handle as `Tensor(A)`, made through DLPack.jl: `DLPack.share(A)`'s legacy
`DLManagedTensor` is handed to `dsd_tensor_from_dlpack`, and DLPack.jl's deleter unpins `A`
when dsd is done. DLPack.jl's table is not guarded against other threads, so prefer `Tensor`
for tensors an asynchronous save may release on its background thread.
"""
function tensor_from_dlpack(A::StridedArray)
    capsule = DLPack.share(A)
    managed = capsule.tensor
    ptr = pointer_from_objref(managed)
    DLPack.SHARES_POOL[ptr] = (capsule, A)
    managed.deleter = DLPack.DELETER[]
    out = Ref(L.dsd_tensor(0))
    checked(L.dsd_tensor_from_dlpack, Ptr{L.DLManagedTensor}(ptr), out)
    return Tensor(out[], A)
end

Tensor(t::Tensor) = t

"A new handle to the same tensor, closed separately."
function retain(t::Tensor)
    out = Ref(L.dsd_tensor(0))
    checked(L.dsd_tensor_retain, _handle(t), out)
    return Tensor(out[], t.array)
end

# A handle the caller's object owns: a new one for a Tensor given, else one over the array.
_own(x::Tensor) = retain(x)
_own(A) = Tensor(A)

"The PyTorch name of the tensor's dtype (\"float32\")."
dtype_name(t::Tensor) = _string(L.dsd_dtype_name(info(t).dtype))

function Base.close(t::Tensor)
    if t.handle.bits != 0
        h, t.handle = t.handle, L.dsd_tensor(0)
        checked(L.dsd_tensor_release, h)
    end
    return nothing
end

# Finalizers never throw: a handle that fails to release is reported by dsd's status only.
function _release!(t::Tensor)
    h, t.handle = t.handle, L.dsd_tensor(0)
    h.bits == 0 || L.dsd_tensor_release(h, C_NULL)
    return nothing
end

function _handle(t::Tensor)
    t.handle.bits == 0 && _closed("Tensor")
    return t.handle
end

function info(t::Tensor)
    out = Ref{L.dsd_tensor_info}()
    checked(L.dsd_tensor_info_get, _handle(t), out)
    return out[]
end

"The PyTorch shape of a tensor handle."
function Base.size(t::Tensor)
    n = Int(info(t).ndim)
    out = Vector{Int64}(undef, n)
    checked(L.dsd_tensor_shape, _handle(t), out, Csize_t(n))
    return Tuple(out)
end

"The PyTorch strides (in elements) of a tensor handle."
function Base.strides(t::Tensor)
    n = Int(info(t).ndim)
    out = Vector{Int64}(undef, n)
    checked(L.dsd_tensor_strides, _handle(t), out, Csize_t(n))
    return Tuple(out)
end

"""
    Array(t::Tensor)

The tensor's elements as a new Julia array of `julia_size(size(t))` (a CPU, contiguous
tensor; the bytes in the same order, so no transpose happens).
"""
function Base.Array(t::Tensor)
    i = info(t)
    i.device.type == L.DSD_DEVICE_CPU || throw(ArgumentError("Array(::Tensor) needs a CPU tensor"))
    i.contiguous || throw(ArgumentError("Array(::Tensor) needs a contiguous tensor"))
    T = get(JULIA_TYPES, i.dtype, nothing)
    T === nothing && throw(ArgumentError("no Julia type for dsd dtype $(i.dtype)"))
    dims = julia_size(size(t))
    i.numel == 0 && return Array{T}(undef, dims)
    return copy(unsafe_wrap(Array, Ptr{T}(i.data), dims))
end

# ----------------------------------------------------------------------------------------
# State dicts

"Raw bytes stored as a `bytes` value (a plain `Vector{UInt8}` would become a tensor)."
struct Bytes
    data::Vector{UInt8}
end

"""
    StateDict(pairs...)   StateDict(:list, values...)   StateDict(:tuple, values...)

A reference to a dsd state-dict container: an ordered dict with string keys, or a list.
Values: `nothing`, `Bool`, integers, floats, strings, `Bytes`, arrays and `Tensor`s (tensors,
aliased), nested `StateDict`s, pairs vectors / dicts (nested dicts), tuples and non-numeric
vectors (lists). `sd[key]` reads (tensors come back as `Tensor` handles, containers as
`StateDict`s); `Dsd.todict(sd)` converts the whole tree.
"""
mutable struct StateDict
    ptr::Ptr{L.dsd_state_dict}
    function StateDict(ptr::Ptr{L.dsd_state_dict})
        sd = new(ptr)
        finalizer(close, sd)
        return sd
    end
end

function StateDict(pairs::Pair...)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_state_dict_new, out)
    sd = StateDict(out[])
    for (k, v) in pairs
        _set!(sd, String(k), v)
    end
    return sd
end

StateDict(d::AbstractDict) = StateDict((String(k) => v for (k, v) in d)...)

function StateDict(kind::Symbol, values...)
    kind in (:list, :tuple) || throw(ArgumentError("StateDict(kind, ...): kind is :list or :tuple"))
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_state_dict_new_list, kind === :tuple, out)
    sd = StateDict(out[])
    for v in values
        _set!(sd, nothing, v)
    end
    return sd
end

function Base.close(sd::StateDict)
    if sd.ptr != C_NULL
        p, sd.ptr = sd.ptr, Ptr{L.dsd_state_dict}(C_NULL)
        L.dsd_state_dict_release(p)
    end
    return nothing
end

function _ptr(sd::StateDict)
    sd.ptr == C_NULL && _closed("StateDict")
    return sd.ptr
end

function Base.length(sd::StateDict)
    out = Ref{Csize_t}(0)
    checked(L.dsd_state_dict_size, _ptr(sd), out)
    return Int(out[])
end

function is_list(sd::StateDict)
    kind = Ref{Int32}(0)
    checked(L.dsd_state_dict_container_kind, _ptr(sd), kind, C_NULL)
    return kind[] == L.DSD_KIND_LIST
end

function Base.keys(sd::StateDict)
    is_list(sd) && return collect(1:length(sd))
    out = Ref{Cstring}(C_NULL)
    return [begin
        checked(L.dsd_state_dict_key, _ptr(sd), Csize_t(i), out)
        _string(out[])
    end for i in 0:length(sd)-1]
end

function _find(sd::StateDict, key::AbstractString)
    out = Ref{Csize_t}(0)
    status = checked(L.dsd_state_dict_find, _ptr(sd), String(key), out; ok = (L.DSD_E_NOT_FOUND,))
    return status == L.DSD_OK ? Int(out[]) : nothing
end

Base.haskey(sd::StateDict, key::AbstractString) = _find(sd, key) !== nothing

function Base.getindex(sd::StateDict, key::AbstractString)
    i = _find(sd, key)
    i === nothing && throw(KeyError(key))
    return _value_at(sd, i)
end

Base.getindex(sd::StateDict, i::Integer) = _value_at(sd, Int(i) - 1)  # lists: 1-based

function _value_at(sd::StateDict, i::Int)
    p, at = _ptr(sd), Csize_t(i)
    kind = Ref{Int32}(0)
    checked(L.dsd_state_dict_kind, p, at, kind)
    k = kind[]
    if k == L.DSD_KIND_NONE
        return nothing
    elseif k == L.DSD_KIND_BOOL
        b = Ref{Bool}(false)
        checked(L.dsd_state_dict_get_bool, p, at, b)
        return b[]
    elseif k == L.DSD_KIND_INT
        n = Ref{Int64}(0)
        checked(L.dsd_state_dict_get_int, p, at, n)
        return n[]
    elseif k == L.DSD_KIND_DOUBLE
        x = Ref{Cdouble}(0)
        checked(L.dsd_state_dict_get_double, p, at, x)
        return x[]
    elseif k == L.DSD_KIND_STRING
        s, len = Ref{Cstring}(C_NULL), Ref{Csize_t}(0)
        checked(L.dsd_state_dict_get_string, p, at, s, len)
        return unsafe_string(Ptr{UInt8}(s[]), len[])
    elseif k == L.DSD_KIND_BYTES
        d, len = Ref{Ptr{Cvoid}}(C_NULL), Ref{Csize_t}(0)
        checked(L.dsd_state_dict_get_bytes, p, at, d, len)
        return Bytes(copy(unsafe_wrap(Array, Ptr{UInt8}(d[]), Int(len[]))))
    elseif k == L.DSD_KIND_TENSOR
        t = Ref(L.dsd_tensor(0))
        checked(L.dsd_state_dict_get_tensor, p, at, t)
        return Tensor(t[], nothing)
    else
        c = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
        checked(L.dsd_state_dict_get_child, p, at, c)
        return StateDict(c[])
    end
end

_key(key::Nothing) = Ptr{Cchar}(C_NULL)  # appends to a list
_key(key::AbstractString) = String(key)

function _set!(sd::StateDict, key, v)
    p, k = _ptr(sd), _key(key)
    if v === nothing
        checked(L.dsd_state_dict_set_none, p, k)
    elseif v isa Bool
        checked(L.dsd_state_dict_set_bool, p, k, v)
    elseif v isa Integer
        checked(L.dsd_state_dict_set_int, p, k, Int64(v))
    elseif v isa AbstractFloat
        checked(L.dsd_state_dict_set_double, p, k, Float64(v))
    elseif v isa AbstractString
        s = String(v)
        checked(L.dsd_state_dict_set_string, p, k, s, Csize_t(sizeof(s)))
    elseif v isa Bytes
        GC.@preserve v checked(L.dsd_state_dict_set_bytes, p, k, pointer(v.data),
            Csize_t(length(v.data)))
    elseif v isa Tensor
        checked(L.dsd_state_dict_set_tensor, p, k, _handle(v))
    elseif v isa AbstractArray{<:Number}
        t = Tensor(v)  # the state dict keeps its own reference
        try
            checked(L.dsd_state_dict_set_tensor, p, k, _handle(t))
        finally
            close(t)
        end
    elseif v isa StateDict
        checked(L.dsd_state_dict_set_child, p, k, _ptr(v))
    else
        child = _container(v)
        try
            checked(L.dsd_state_dict_set_child, p, k, _ptr(child))
        finally
            close(child)
        end
    end
    return sd
end

_container(v::AbstractDict) = StateDict(v)
_container(v::AbstractVector{<:Pair}) = StateDict(v...)
_container(v::Tuple) = StateDict(:tuple, v...)
_container(v::AbstractVector) = StateDict(:list, v...)
_container(v) = throw(ArgumentError("a state dict cannot hold a $(typeof(v))"))

function Base.setindex!(sd::StateDict, v, key::AbstractString)
    is_list(sd) && throw(ArgumentError("lists are appended to with push!"))
    _set!(sd, key, v)
    return sd
end

function Base.push!(sd::StateDict, v)
    is_list(sd) || throw(ArgumentError("push! appends to a list; dicts take sd[key] = v"))
    return _set!(sd, nothing, v)
end

function Base.delete!(sd::StateDict, key::AbstractString)
    i = _find(sd, key)
    i === nothing || checked(L.dsd_state_dict_remove, _ptr(sd), Csize_t(i))
    return sd
end

"A new reference to the same container."
retain(sd::StateDict) = StateDict(L.dsd_state_dict_retain(_ptr(sd)))

"Whether the keys of a dict stand for integers (PyTorch's positional optimizer state)."
function int_keys(sd::StateDict)
    out = Ref{Bool}(false)
    checked(L.dsd_state_dict_int_keys, _ptr(sd), out)
    return out[]
end

set_int_keys!(sd::StateDict, on::Bool) = (checked(L.dsd_state_dict_set_int_keys, _ptr(sd), on); sd)

"Whether the value at `key` is a distributed tensor."
function is_dist_tensor(sd::StateDict, key::AbstractString)
    i = _find(sd, key)
    i === nothing && throw(KeyError(key))
    out = Ref{Bool}(false)
    checked(L.dsd_state_dict_is_dist_tensor, _ptr(sd), Csize_t(i), out)
    return out[]
end

"The layout of the distributed tensor at `key`."
function layout(sd::StateDict, key::AbstractString)
    i = _find(sd, key)
    i === nothing && throw(KeyError(key))
    out = Ref(L.dsd_layout(0))
    checked(L.dsd_state_dict_get_layout, _ptr(sd), Csize_t(i), out)
    return Layout(out[])
end

"""
    flatten(sd) -> (flat, mapping)

DCP's flattening: dot-joined keys ("state.fc.weight.step") and the path of each.
"""
function flatten(sd::StateDict)
    flat, mapping = Ref{Ptr{L.dsd_state_dict}}(C_NULL), Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_state_dict_flatten, _ptr(sd), flat, mapping)
    return StateDict(flat[]), StateDict(mapping[])
end

function unflatten(flat::StateDict, mapping::StateDict)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_state_dict_unflatten, _ptr(flat), _ptr(mapping), out)
    return StateDict(out[])
end

"""
    Dsd.todict(sd)

The tree as Julia values: dicts as `Vector{Pair{String,Any}}` (in order), lists as
`Vector{Any}`, tensors as `Array`s (copies, in `julia_size` order).
"""
function todict(sd::StateDict)
    convert_value(v) = v isa StateDict ? (try todict(v) finally close(v) end) :
                       v isa Tensor ? (try Array(v) finally close(v) end) : v
    if is_list(sd)
        return Any[convert_value(sd[i]) for i in 1:length(sd)]
    end
    return Pair{String,Any}[k => convert_value(sd[k]) for k in keys(sd)]
end

"Whether two trees are equal (same keys in order, equal scalars, tensors of equal bytes)."
function Base.:(==)(a::StateDict, b::StateDict)
    eq = Ref{Bool}(false)
    checked(L.dsd_state_dict_equal, _ptr(a), _ptr(b), eq, C_NULL)
    return eq[]
end

# ----------------------------------------------------------------------------------------
# Communicators

function _comm_options(timeout_ms)
    timeout_ms === nothing && return Ptr{L.dsd_comm_options}(C_NULL)
    return _options(L.dsd_comm_options, L.dsd_comm_options_init, (; timeout_ms))
end

"""
    Communicator(; timeout_ms)                       # from the launcher's environment
    Communicator(path, rank, size; timeout_ms)       # rendezvous through a shared file
    Communicator(nccl_comm, cuda_stream, rank, size) # over an NCCL.jl communicator
    Communicator(f, args...)                         # do-block: closed when f returns

With no argument: when a launcher's variables are set (torchrun/dsdrun `RANK`, mpirun
`OMPI_COMM_WORLD_RANK`, srun `SLURM_PROCID`), a Gloo communicator from them
(`dsd_comm_new_from_env`); otherwise a communicator of one rank (`dsd_comm_new_local`).
The NCCL form borrows an `ncclComm_t` (NCCL.jl: `Ptr{Cvoid}(comm.handle)`) and a
`cudaStream_t`, which must outlive every dsd object made over it.
"""
mutable struct Communicator
    ptr::Ptr{L.dsd_comm}
    function Communicator(ptr::Ptr{L.dsd_comm})
        c = new(ptr)
        finalizer(close, c)
        return c
    end
end

const LAUNCHER_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
launched() = any(v -> haskey(ENV, v), LAUNCHER_VARIABLES)

function Communicator(; timeout_ms::Union{Integer,Nothing} = nothing, local_only::Bool = false)
    out = Ref{Ptr{L.dsd_comm}}(C_NULL)
    if local_only || !launched()
        checked(L.dsd_comm_new_local, out)
    else
        checked(L.dsd_comm_new_from_env, _comm_options(timeout_ms), out)
    end
    return Communicator(out[])
end

function Communicator(path::AbstractString, rank::Integer, size::Integer;
                      timeout_ms::Union{Integer,Nothing} = nothing)
    out = Ref{Ptr{L.dsd_comm}}(C_NULL)
    checked(L.dsd_comm_new_file_store, String(path), Int32(rank), Int32(size),
        _comm_options(timeout_ms), out)
    return Communicator(out[])
end

function Communicator(nccl_comm::Ptr, cuda_stream::Ptr, rank::Integer, size::Integer;
                      timeout_ms::Union{Integer,Nothing} = nothing)
    out = Ref{Ptr{L.dsd_comm}}(C_NULL)
    checked(L.dsd_comm_new_nccl, Ptr{Cvoid}(nccl_comm), Ptr{Cvoid}(cuda_stream), Int32(rank),
        Int32(size), _comm_options(timeout_ms), out)
    return Communicator(out[])
end

Communicator(f::Function, args...; kw...) = _with(f, Communicator(args...; kw...))

function _with(f, x)
    try
        return f(x)
    finally
        close(x)
    end
end

function Base.close(c::Communicator)
    if c.ptr != C_NULL
        p, c.ptr = c.ptr, Ptr{L.dsd_comm}(C_NULL)
        L.dsd_comm_release(p)  # dsd objects made over it keep their own references
    end
    return nothing
end

_ptr(c::Communicator) = c.ptr == C_NULL ? _closed("Communicator") : c.ptr
_ptr(::Nothing) = Ptr{L.dsd_comm}(C_NULL)  # a single process

"A new reference to the same communicator, closed separately."
retain(c::Communicator) = Communicator(L.dsd_comm_retain(_ptr(c)))

function rank(c::Communicator)
    out = Ref{Int32}(0)
    checked(L.dsd_comm_rank, _ptr(c), out)
    return Int(out[])
end

function world_size(c::Communicator)
    out = Ref{Int32}(0)
    checked(L.dsd_comm_size, _ptr(c), out)
    return Int(out[])
end

function backend(c::Communicator)
    out = Ref{Cstring}(C_NULL)
    checked(L.dsd_comm_backend, _ptr(c), out)
    return _string(out[])
end

barrier(c::Communicator) = (checked(L.dsd_comm_barrier, _ptr(c)); nothing)

# ----------------------------------------------------------------------------------------
# Device meshes, layouts and distributed tensors (PyTorch's DeviceMesh, placements, DTensor)
#
# Shapes and tensor dimensions here are PyTorch's (`torch_shape` order, 0-based dims): a
# Julia array's dimension d (1-based) is PyTorch's dimension ndims(A) - d. Sharding a Julia
# matrix along its columns (d = 2) is Shard(0).

"""
    Mesh(comm, shape; ranks = nothing, device = :cpu)   Mesh(f, comm, shape; ...)

A device mesh of `shape` over the ranks of `comm` (`ranks`: the global rank at each position
in row-major order, as `DeviceMesh.mesh.flatten()`; default 0, 1, ...).
"""
mutable struct Mesh
    ptr::Ptr{L.dsd_mesh}
    function Mesh(ptr::Ptr{L.dsd_mesh})
        m = new(ptr)
        finalizer(close, m)
        return m
    end
end

const DEVICE_TYPES = Dict(:cpu => L.DSD_DEVICE_CPU, :cuda => L.DSD_DEVICE_CUDA)

function Mesh(comm::Communicator, shape; ranks = nothing, device::Symbol = :cpu)
    dims = Int64[shape...]
    out = Ref{Ptr{L.dsd_mesh}}(C_NULL)
    if ranks === nothing
        checked(L.dsd_mesh_new, _ptr(comm), dims, Csize_t(length(dims)), Ptr{Int32}(C_NULL),
            Csize_t(0), DEVICE_TYPES[device], out)
    else
        rs = Int32[ranks...]
        checked(L.dsd_mesh_new, _ptr(comm), dims, Csize_t(length(dims)), rs, Csize_t(length(rs)),
            DEVICE_TYPES[device], out)
    end
    return Mesh(out[])
end

Mesh(f::Function, comm::Communicator, shape; kw...) = _with(f, Mesh(comm, shape; kw...))

_ptr(m::Mesh) = m.ptr == C_NULL ? _closed("Mesh") : m.ptr

function Base.close(m::Mesh)
    if m.ptr != C_NULL
        p, m.ptr = m.ptr, Ptr{L.dsd_mesh}(C_NULL)
        L.dsd_mesh_release(p)  # layouts over it keep their own references
    end
    return nothing
end

function Base.ndims(m::Mesh)
    out = Ref{Csize_t}(0)
    checked(L.dsd_mesh_ndim, _ptr(m), out)
    return Int(out[])
end

function Base.size(m::Mesh)
    out = Vector{Int64}(undef, ndims(m))
    checked(L.dsd_mesh_shape, _ptr(m), out, Csize_t(length(out)))
    return Tuple(out)
end

function ranks(m::Mesh)
    out = Vector{Int32}(undef, prod(size(m)))
    checked(L.dsd_mesh_ranks, _ptr(m), out, Csize_t(length(out)))
    return Int.(out)
end

function device_type(m::Mesh)
    out = Ref{Int32}(0)
    checked(L.dsd_mesh_device_type, _ptr(m), out)
    return out[] == L.DSD_DEVICE_CUDA ? :cuda : :cpu
end

"This process's coordinate in the mesh (0-based), or `nothing` when it is not part of it."
function coordinate(m::Mesh)
    inside = Ref{Bool}(false)
    out = Vector{Int64}(undef, ndims(m))
    checked(L.dsd_mesh_coordinate, _ptr(m), inside, out, Csize_t(length(out)))
    return inside[] ? Tuple(out) : nothing
end

"PyTorch's Shard(dim): split PyTorch tensor dimension `dim` (0-based) over a mesh dimension."
struct Shard
    dim::Int
end

"PyTorch's Replicate()."
struct Replicate end

_placement(p::Shard) = L.dsd_placement(L.DSD_PLACEMENT_SHARD, Int32(p.dim))
_placement(::Replicate) = L.dsd_placement(L.DSD_PLACEMENT_REPLICATE, Int32(0))

"""
    Layout(mesh, global_shape, placements...)          # Shard / Replicate per mesh dimension
    Layout(mesh, global_shape; offsets, sizes)          # an explicit chunk held by this rank

How a distributed tensor of PyTorch shape `global_shape` is split. `local_chunk(layout)`
gives this rank's box (offsets, sizes), PyTorch's compute_local_shape_and_global_offset.
"""
mutable struct Layout
    handle::L.dsd_layout
    function Layout(handle::L.dsd_layout)
        l = new(handle)
        finalizer(_release!, l)
        return l
    end
end

function Layout(mesh::Mesh, global_shape, placements::Union{Shard,Replicate}...)
    shape = Int64[global_shape...]
    ps = L.dsd_placement[_placement(p) for p in placements]
    out = Ref(L.dsd_layout(0))
    checked(L.dsd_layout_new_placements, _ptr(mesh), shape, Csize_t(length(shape)), ps,
        Csize_t(length(ps)), out)
    return Layout(out[])
end

function Layout(mesh::Mesh, global_shape; offsets, sizes)
    shape, o, z = Int64[global_shape...], Int64[offsets...], Int64[sizes...]
    length(o) == length(z) == length(shape) ||
        throw(ArgumentError("offsets and sizes need one value per dimension"))
    out = Ref(L.dsd_layout(0))
    checked(L.dsd_layout_new_chunk, _ptr(mesh), shape, Csize_t(length(shape)), o, z, out)
    return Layout(out[])
end

_handle(l::Layout) = l.handle.bits == 0 ? _closed("Layout") : l.handle

function Base.close(l::Layout)
    if l.handle.bits != 0
        h, l.handle = l.handle, L.dsd_layout(0)
        checked(L.dsd_layout_release, h)
    end
    return nothing
end

function _release!(l::Layout)
    h, l.handle = l.handle, L.dsd_layout(0)
    h.bits == 0 || L.dsd_layout_release(h, C_NULL)
    return nothing
end

function retain(l::Layout)
    out = Ref(L.dsd_layout(0))
    checked(L.dsd_layout_retain, _handle(l), out)
    return Layout(out[])
end

function Base.ndims(l::Layout)
    out = Ref{Csize_t}(0)
    checked(L.dsd_layout_ndim, _handle(l), out)
    return Int(out[])
end

"The global PyTorch shape."
function Base.size(l::Layout)
    out = Vector{Int64}(undef, ndims(l))
    checked(L.dsd_layout_global_shape, _handle(l), out, Csize_t(length(out)))
    return Tuple(out)
end

"This rank's box of the global tensor, PyTorch order: (offsets, sizes)."
function local_chunk(l::Layout)
    n = ndims(l)
    offsets, sizes = Vector{Int64}(undef, n), Vector{Int64}(undef, n)
    checked(L.dsd_layout_local_chunk, _handle(l), offsets, sizes, Csize_t(n))
    return Tuple(offsets), Tuple(sizes)
end

"The Julia size of this rank's local array for the layout: `julia_size(local_chunk(l)[2])`."
local_size(l::Layout) = julia_size(local_chunk(l)[2])

function is_chunk(l::Layout)
    out = Ref{Bool}(false)
    checked(L.dsd_layout_is_chunk, _handle(l), out)
    return out[]
end

function placements(l::Layout)
    mesh = layout_mesh(l)
    n = try
        ndims(mesh)
    finally
        close(mesh)
    end
    out = Vector{L.dsd_placement}(undef, n)
    checked(L.dsd_layout_placements, _handle(l), out, Csize_t(n))
    return [p.kind == L.DSD_PLACEMENT_SHARD ? Shard(Int(p.dim)) : Replicate() for p in out]
end

"A new reference to the layout's mesh."
function layout_mesh(l::Layout)
    out = Ref{Ptr{L.dsd_mesh}}(C_NULL)
    checked(L.dsd_layout_mesh, _handle(l), out)
    return Mesh(out[])
end

"""
    Tensor(A, layout)

A distributed tensor: this rank's local array `A` (of Julia size `local_size(layout)`) with
its layout. Register it with a model (`add_parameter!(m, name, t)`) or store it in a state
dict; checkpoint loads then reshard into `A`.
"""
function Tensor(A::AbstractArray, l::Layout)
    local_ = Tensor(A)
    try
        out = Ref(L.dsd_tensor(0))
        checked(L.dsd_tensor_new_dist, _handle(local_), _handle(l), out)
        return Tensor(out[], A)
    finally
        close(local_)  # the distributed handle keeps its own reference
    end
end

"The layout of a distributed tensor handle."
function layout(t::Tensor)
    out = Ref(L.dsd_layout(0))
    checked(L.dsd_tensor_layout, _handle(t), out)
    return Layout(out[])
end

# ----------------------------------------------------------------------------------------
# Option structs: `_init` sets the defaults and struct_size, keywords override fields.

function _options(::Type{T}, init, kw) where {T}
    r = Ref{T}()
    init(r)
    isempty(kw) && return r
    for k in keys(kw)
        k in fieldnames(T) && k !== :struct_size ||
            throw(ArgumentError("$(T) has no option $(k)"))
        fieldtype(T, k) === Cstring && throw(ArgumentError("option $(k) cannot be set from Julia"))
    end
    v = r[]
    r[] = T((haskey(kw, f) ? convert(fieldtype(T, f), kw[f]) : getfield(v, f)
             for f in fieldnames(T))...)
    return r
end

_opts(::Type{T}, init, kw) where {T} = isempty(kw) ? Ptr{T}(C_NULL) : _options(T, init, kw)

"""
    Dsd.StateDictOptions(; full_state_dict, cpu_offload, ignore_frozen_params,
        keep_submodule_prefixes, strict, broadcast_from_rank0, flatten_optimizer_state_dict,
        bucket_bytes)

PyTorch's StateDictOptions, with its defaults (`dsd_state_dict_options_init`).
"""
StateDictOptions(; kw...) = _options(L.dsd_state_dict_options, L.dsd_state_dict_options_init,
    values(kw))

_sd_options(::Nothing) = Ptr{L.dsd_state_dict_options}(C_NULL)
_sd_options(o::Base.RefValue{L.dsd_state_dict_options}) = o

# ----------------------------------------------------------------------------------------
# Models and optimizers

"""
    Model(comm, "fc1.weight" => W1, "fc1.bias" => b1, ...; class_name = "Model")

A model registry: each pair registers a parameter under its raw name (in state-dict order),
aliasing the array (see the column-major rule). `comm` may be `nothing` (one process). Names
are strings (dots are not Julia keywords, hence pairs rather than keyword arguments). More
entries: `add_parameter!`, `add_buffer!`. `close(m)` frees the registry; the arrays stay
pinned while a state dict still refers to them.
"""
mutable struct Model
    ptr::Ptr{L.dsd_model}
    tensors::Vector{Pair{String,Tensor}}  # registration order
    function Model(ptr::Ptr{L.dsd_model})
        m = new(ptr, Pair{String,Tensor}[])
        finalizer(close, m)
        return m
    end
end

function Model(comm::Union{Communicator,Nothing}, params::Pair...; class_name::AbstractString = "Model")
    out = Ref{Ptr{L.dsd_model}}(C_NULL)
    checked(L.dsd_model_new, _ptr(comm), String(class_name), out)
    m = Model(out[])
    try
        for (name, A) in params
            add_parameter!(m, String(name), A)
        end
    catch
        close(m)
        rethrow()
    end
    return m
end

Model(f::Function, args...; kw...) = _with(f, Model(args...; kw...))

_ptr(m::Model) = m.ptr == C_NULL ? _closed("Model") : m.ptr

function add_parameter!(m::Model, name::AbstractString, A; requires_grad::Bool = true)
    t = _own(A)  # an array, or a Tensor (e.g. a distributed one, `Tensor(A, layout)`)
    try
        checked(L.dsd_model_add_parameter, _ptr(m), String(name), _handle(t), requires_grad)
    catch
        close(t)
        rethrow()
    end
    push!(m.tensors, String(name) => t)
    return t
end

function add_buffer!(m::Model, name::AbstractString, A; persistent::Bool = true)
    t = _own(A)
    try
        checked(L.dsd_model_add_buffer, _ptr(m), String(name), _handle(t), persistent)
    catch
        close(t)
        rethrow()
    end
    push!(m.tensors, String(name) => t)
    return t
end

"Registers `<module>._extra_state` as raw bytes."
function add_extra_state!(m::Model, name::AbstractString, data::Vector{UInt8})
    GC.@preserve data checked(L.dsd_model_add_extra_state_bytes, _ptr(m), String(name),
        pointer(data), Csize_t(length(data)))
    return m
end

"Declares a wrapper module (`LibDsd.DSD_WRAPPER_*`) at a raw module path."
function declare_wrapper!(m::Model, module_path::AbstractString, kind::Integer)
    checked(L.dsd_model_declare_wrapper, _ptr(m), String(module_path), Int32(kind))
    return m
end

function canonical_fqn(m::Model, raw_name::AbstractString)
    out = Ref{Cstring}(C_NULL)
    checked(L.dsd_model_canonical_fqn, _ptr(m), String(raw_name), out)
    return _string(out[])
end

"Registers `<module>._extra_state` as the value at `key` of `holder` (any kind)."
function add_extra_state!(m::Model, name::AbstractString, holder::StateDict, key::AbstractString)
    i = _find(holder, key)
    i === nothing && throw(KeyError(key))
    checked(L.dsd_model_add_extra_state, _ptr(m), String(name), _ptr(holder), Csize_t(i))
    return m
end

"PyTorch's `_fqn_modifiers`: at `module_path`, state-dict segment `segment` is child `child`."
function add_fqn_modifier!(m::Model, module_path::AbstractString, segment::AbstractString,
                           child::AbstractString)
    checked(L.dsd_model_add_fqn_modifier, _ptr(m), String(module_path), String(segment), String(child))
    return m
end

"Every registered entry by raw name with its current value (extra state as loaded)."
function entries(m::Model)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_model_entries, _ptr(m), out)
    return StateDict(out[])
end

"The handle registered under `name`."
function parameter(m::Model, name::AbstractString)
    for (n, t) in m.tensors
        n == name && return t
    end
    throw(KeyError(name))
end

function Base.close(m::Model)
    if m.ptr != C_NULL
        p, m.ptr = m.ptr, Ptr{L.dsd_model}(C_NULL)
        L.dsd_model_free(p)
        foreach(nt -> _release!(nt.second), m.tensors)  # never throws (also a finalizer)
        empty!(m.tensors)
    end
    return nothing
end

"""
    Optimizer(model)

An optimizer registry over `model`'s parameters: `add_param_group!` (hyperparameters + member
parameters, by name) and `set_param_state!` (per-parameter state: Adam's `step`, `exp_avg`,
`exp_avg_sq` arrays, aliased). Loads copy into those arrays in place and update the group
dicts returned by `add_param_group!` (read `lr` back from them).
"""
mutable struct Optimizer
    ptr::Ptr{L.dsd_optim}
    model::Model
    params::Vector{String}     # in group order: position = PyTorch's parameter id
    groups::Vector{StateDict}  # hyperparameters, shared with dsd
    materialize::Any
    materialize_key::UInt
    function Optimizer(ptr::Ptr{L.dsd_optim}, model::Model)
        o = new(ptr, model, String[], StateDict[], nothing, UInt(0))
        finalizer(close, o)
        return o
    end
end

function Optimizer(model::Model)
    out = Ref{Ptr{L.dsd_optim}}(C_NULL)
    checked(L.dsd_optim_new, out)
    return Optimizer(out[], model)
end

Optimizer(f::Function, model::Model) = _with(f, Optimizer(model))

_ptr(o::Optimizer) = o.ptr == C_NULL ? _closed("Optimizer") : o.ptr

"""
    add_param_group!(opt, names; lr = 1e-3, betas = (0.9, 0.999), ...) -> StateDict

Adds a param group of the model's parameters `names` with the given hyperparameters (any
keywords; tuples become tuples, as PyTorch's `betas`). Returns the group's dict, which a load
updates in place.
"""
function add_param_group!(o::Optimizer, names::AbstractVector{<:AbstractString}; hyper...)
    group = StateDict((String(k) => v for (k, v) in pairs(hyper))...)
    handles = L.dsd_tensor[_handle(parameter(o.model, n)) for n in names]
    try
        checked(L.dsd_optim_add_param_group, _ptr(o), _ptr(group), handles, Csize_t(length(handles)))
    catch
        close(group)
        rethrow()
    end
    append!(o.params, String.(names))
    push!(o.groups, group)
    return group
end

"""
    set_param_state!(opt, name, "step" => step, "exp_avg" => m, "exp_avg_sq" => v)

Sets the state of parameter `name` (arrays aliased; a 0-dimensional `fill(0f0)` is PyTorch's
scalar `step` tensor).
"""
function set_param_state!(o::Optimizer, name::AbstractString, state::Pair...)
    st = StateDict(state...)
    try
        checked(L.dsd_optim_set_param_state, _ptr(o), _handle(parameter(o.model, name)), _ptr(st))
    finally
        close(st)  # the optimizer keeps its own reference
    end
    return o
end

"A new reference to parameter `name`'s state dict."
function param_state(o::Optimizer, name::AbstractString)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_optim_get_param_state, _ptr(o), _handle(parameter(o.model, name)), out)
    return StateDict(out[])
end

"A new reference to group `i`'s (1-based) hyperparameter dict."
function param_group(o::Optimizer, i::Integer)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_optim_get_param_group, _ptr(o), Csize_t(i - 1), out)
    return StateDict(out[])
end

function num_param_groups(o::Optimizer)
    out = Ref{Csize_t}(0)
    checked(L.dsd_optim_param_group_count, _ptr(o), out)
    return Int(out[])
end

# Optimizers with a materialize callback, by integer key (the callback's user_data); weak, so
# that an optimizer nobody closes can still be finalized.
const MATERIALIZERS = IdDict{UInt,WeakRef}()

function _materialize(user_data::Ptr{Cvoid}, ::Ptr{L.dsd_optim}, ::Ptr{L.dsd_tensor},
                      pids::Ptr{Csize_t}, count::Csize_t)::Int32
    try
        o = _locked(() -> MATERIALIZERS[UInt(user_data)].value)::Optimizer
        names = [o.params[Int(unsafe_load(pids, i)) + 1] for i in 1:Int(count)]
        o.materialize(o, names)
        return Int32(L.DSD_OK)
    catch e
        @error "Dsd: the materialize callback failed" exception = (e, catch_backtrace())
        return Int32(L.DSD_E_CALLBACK)
    end
end

"""
    set_materialize!(f, opt)

`f(opt, names)` creates the state of parameters that have none yet (with
`set_param_state!`), for lazily-initialised optimizers; dsd calls it (on the calling
thread) from any get/set that needs the state, and no step is taken.
"""
function set_materialize!(f, o::Optimizer)
    key = o.materialize_key == 0 ? Threads.atomic_add!(NEXT_PIN, UInt(1)) + UInt(1) : o.materialize_key
    o.materialize, o.materialize_key = f, key
    _locked(() -> (MATERIALIZERS[key] = WeakRef(o)))
    checked(L.dsd_optim_set_materialize, _ptr(o), MATERIALIZE_CALLBACK[], Ptr{Cvoid}(key))
    return o
end

function Base.close(o::Optimizer)
    if o.ptr != C_NULL
        p, o.ptr = o.ptr, Ptr{L.dsd_optim}(C_NULL)
        L.dsd_optim_free(p)
        foreach(close, o.groups)
        empty!(o.groups)
        key = o.materialize_key
        key == 0 || _locked(() -> delete!(MATERIALIZERS, key))
    end
    return nothing
end

_optims(optims) = Ptr{L.dsd_optim}[_ptr(o) for o in optims]

# The keys a load did not match, read out and freed.
function _incompatible_keys(keys::Ptr{L.dsd_incompatible_keys})
    keys == C_NULL && return (missing = String[], unexpected = String[], skipped = String[])
    try
        lists = map((L.DSD_KEYS_MISSING, L.DSD_KEYS_UNEXPECTED, L.DSD_KEYS_SKIPPED)) do list
            n, s = Ref{Csize_t}(0), Ref{Cstring}(C_NULL)
            checked(L.dsd_incompatible_keys_count, keys, Int32(list), n)
            [begin
                checked(L.dsd_incompatible_keys_key, keys, Int32(list), Csize_t(i), s)
                _string(s[])
            end for i in 0:Int(n[])-1]
        end
        return (missing = lists[1], unexpected = lists[2], skipped = lists[3])
    finally
        L.dsd_incompatible_keys_free(keys)
    end
end

"""
    get_model_state_dict(model; options = nothing) -> StateDict

PyTorch's `get_model_state_dict`: keyed by canonical FQN, tensors aliasing the model's arrays
(unless the options ask for full or CPU tensors). `options`: `Dsd.StateDictOptions(...)`.
"""
function get_model_state_dict(m::Model; options = nothing)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_get_model_state_dict, _ptr(m), _sd_options(options), out)
    return StateDict(out[])
end

"The model state dict of the given raw submodule paths only (deprecated in PyTorch too)."
function get_model_state_dict(m::Model, submodules::AbstractVector{<:AbstractString}; options = nothing)
    names = String.(submodules)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_get_model_state_dict_submodules, _ptr(m), names, Csize_t(length(names)),
        _sd_options(options), out)
    return StateDict(out[])
end

"Copies `sd` into the model's arrays in place; returns the missing/unexpected keys."
function set_model_state_dict(m::Model, sd::StateDict; options = nothing)
    keys = Ref{Ptr{L.dsd_incompatible_keys}}(C_NULL)
    checked(L.dsd_set_model_state_dict, _ptr(m), _ptr(sd), _sd_options(options), keys)
    return _incompatible_keys(keys[])
end

function get_optimizer_state_dict(m::Model, optims::Optimizer...; options = nothing)
    ps = _optims(optims)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_get_optimizer_state_dict, _ptr(m), ps, Csize_t(length(ps)), _sd_options(options), out)
    return StateDict(out[])
end

function set_optimizer_state_dict(m::Model, optims::Optimizer...; state_dict::StateDict,
                                  options = nothing)
    ps = _optims(optims)
    checked(L.dsd_set_optimizer_state_dict, _ptr(m), ps, Csize_t(length(ps)), _ptr(state_dict),
        _sd_options(options))
    return nothing
end

"""
    get_state_dict(model, optims...; options = nothing) -> (model_sd, optim_sd)

PyTorch's `get_state_dict`: the model's and the optimizers' state dicts, FQN-keyed.
"""
function get_state_dict(m::Model, optims::Optimizer...; options = nothing)
    ps = _optims(optims)
    msd, osd = Ref{Ptr{L.dsd_state_dict}}(C_NULL), Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_get_state_dict, _ptr(m), ps, Csize_t(length(ps)), _sd_options(options), msd, osd)
    return StateDict(msd[]), StateDict(osd[])
end

"""
    set_state_dict(model, optims...; model_state_dict, optim_state_dict, options = nothing)

PyTorch's `set_state_dict`: loads both (the optimizers first), in place. Returns the model's
missing/unexpected keys.
"""
function set_state_dict(m::Model, optims::Optimizer...; model_state_dict::StateDict,
                        optim_state_dict::StateDict, options = nothing)
    ps = _optims(optims)
    keys = Ref{Ptr{L.dsd_incompatible_keys}}(C_NULL)
    checked(L.dsd_set_state_dict, _ptr(m), ps, Csize_t(length(ps)), _ptr(model_state_dict),
        _ptr(optim_state_dict), _sd_options(options), keys)
    return _incompatible_keys(keys[])
end

"""
    optim_state_dict_to_fqn(positional, names) / optim_state_dict_to_positional(fqn_form, names)

Pure remapping between PyTorch's positional `optim.state_dict()` and the FQN form, given the
FQN of each parameter id in order.
"""
function optim_state_dict_to_fqn(positional::StateDict, names::AbstractVector{<:AbstractString})
    ns = String.(names)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_optim_state_dict_to_fqn, _ptr(positional), ns, Csize_t(length(ns)), out)
    return StateDict(out[])
end

function optim_state_dict_to_positional(fqn_form::StateDict, names::AbstractVector{<:AbstractString})
    ns = String.(names)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_optim_state_dict_to_positional, _ptr(fqn_form), ns, Csize_t(length(ns)), out)
    return StateDict(out[])
end

# ----------------------------------------------------------------------------------------
# Checkpoints

const FORMATS = Dict(:dsd => L.DSD_FORMAT_DSD, :dcp => L.DSD_FORMAT_DCP)

function _save_options(kw::NamedTuple)
    isempty(kw) && return Ptr{L.dsd_checkpoint_save_options}(C_NULL)
    if haskey(kw, :format) && kw.format isa Symbol
        kw = merge(kw, (format = FORMATS[kw.format],))
    end
    return _options(L.dsd_checkpoint_save_options, L.dsd_checkpoint_save_options_init, kw)
end

_load_options(kw) = _opts(L.dsd_checkpoint_load_options, L.dsd_checkpoint_load_options_init,
    values(kw))

"""
    checkpoint_save(comm, sd, path; overwrite, thread_count, save_to_lowest_rank, sync_files,
        block_size, format = :dsd | :dcp, enable_plan_caching, max_staging_bytes)

Saves `sd` to the directory `path` (collective over `comm`; `nothing`: one process).
"""
function checkpoint_save(comm::Union{Communicator,Nothing}, sd::StateDict, path::AbstractString; kw...)
    checked(L.dsd_checkpoint_save, _ptr(comm), _ptr(sd), String(path), _save_options(values(kw)))
    return nothing
end

"""
    checkpoint_load(comm, sd, path; strict, thread_count, verify) -> (missing, unexpected, skipped)

Loads the checkpoint at `path` (dsd's, or PyTorch DCP's, saved at any world size) into `sd`
in place, resharding as needed.
"""
function checkpoint_load(comm::Union{Communicator,Nothing}, sd::StateDict, path::AbstractString; kw...)
    keys = Ref{Ptr{L.dsd_incompatible_keys}}(C_NULL)
    checked(L.dsd_checkpoint_load, _ptr(comm), _ptr(sd), String(path), _load_options(kw), keys)
    return _incompatible_keys(keys[])
end

"A new state dict of full CPU tensors read from `path` (all keys, or those selected)."
function checkpoint_load_full(path::AbstractString; keys::AbstractVector{<:AbstractString} = String[])
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    ks = String.(keys)
    if isempty(ks)
        checked(L.dsd_checkpoint_load_full, String(path), Ptr{Cstring}(C_NULL), Csize_t(0), out)
    else
        checked(L.dsd_checkpoint_load_full, String(path), ks, Csize_t(length(ks)), out)
    end
    return StateDict(out[])
end

"Checks every checksum of the checkpoint at `path`; throws a DsdError naming the damage."
checkpoint_verify(path::AbstractString) = (checked(L.dsd_checkpoint_verify, String(path)); nothing)

"""
    SaveFuture

An asynchronous save in flight. `wait(f)` is task-friendly: it polls `dsd_future_wait(f, 0)`
and yields (`sleep(poll)`) between polls, so other tasks run; it throws the save's error.
"""
mutable struct SaveFuture
    ptr::Ptr{L.dsd_future}
    function SaveFuture(ptr::Ptr{L.dsd_future})
        f = new(ptr)
        finalizer(close, f)
        return f
    end
end

_ptr(f::SaveFuture) = f.ptr == C_NULL ? _closed("SaveFuture") : f.ptr

function Base.wait(f::SaveFuture; poll::Real = 0.005)
    while true
        status = checked(L.dsd_future_wait, _ptr(f), Int64(0); ok = (L.DSD_E_TIMEOUT,))
        status == L.DSD_OK && return nothing
        yield()
        sleep(poll)
    end
end

function Base.isready(f::SaveFuture)
    out = Ref{Bool}(false)
    checked(L.dsd_future_is_done, _ptr(f), out)
    return out[]
end

function isstaged(f::SaveFuture)
    out = Ref{Bool}(false)
    checked(L.dsd_future_is_staged, _ptr(f), out)
    return out[]
end

function Base.close(f::SaveFuture)
    if f.ptr != C_NULL
        p, f.ptr = f.ptr, Ptr{L.dsd_future}(C_NULL)
        L.dsd_future_free(p)  # a save in flight goes on
    end
    return nothing
end

"""
    AsyncCheckpointer(comm)   AsyncCheckpointer(f, comm)

PyTorch's AsyncCheckpointer: reusable staging buffers and one background writer over its own
clone of `comm`. `checkpoint_save_async(ac, sd, path; ...)` returns a `SaveFuture` once the
state is staged (the arrays may then change). `close` waits for the save in flight.
"""
mutable struct AsyncCheckpointer
    ptr::Ptr{L.dsd_async_checkpointer}
    function AsyncCheckpointer(ptr::Ptr{L.dsd_async_checkpointer})
        a = new(ptr)
        finalizer(close, a)
        return a
    end
end

function AsyncCheckpointer(comm::Union{Communicator,Nothing})
    out = Ref{Ptr{L.dsd_async_checkpointer}}(C_NULL)
    checked(L.dsd_async_checkpointer_new, _ptr(comm), out)
    return AsyncCheckpointer(out[])
end

AsyncCheckpointer(f::Function, comm) = _with(f, AsyncCheckpointer(comm))

_ptr(a::AsyncCheckpointer) = a.ptr == C_NULL ? _closed("AsyncCheckpointer") : a.ptr

function Base.close(a::AsyncCheckpointer)
    if a.ptr != C_NULL
        p, a.ptr = a.ptr, Ptr{L.dsd_async_checkpointer}(C_NULL)
        L.dsd_async_checkpointer_free(p)
    end
    return nothing
end

function checkpoint_save_async(a::AsyncCheckpointer, sd::StateDict, path::AbstractString; kw...)
    out = Ref{Ptr{L.dsd_future}}(C_NULL)
    checked(L.dsd_checkpoint_save_async, _ptr(a), _ptr(sd), String(path), _save_options(values(kw)), out)
    return SaveFuture(out[])
end

"""
    CheckpointManager(comm, root; keep_last = 0)   CheckpointManager(f, comm, root; ...)

Saves to `root/step_<N>`, moves `latest` after each commit, keeps the newest `keep_last`
checkpoints (0: all). `save(mgr, sd, step)`, `save_async(mgr, sd, step)` (a `SaveFuture`),
`latest_step(mgr)`, `load_latest!(mgr, sd)`.
"""
mutable struct CheckpointManager
    ptr::Ptr{L.dsd_checkpoint_manager}
    function CheckpointManager(ptr::Ptr{L.dsd_checkpoint_manager})
        m = new(ptr)
        finalizer(close, m)
        return m
    end
end

function CheckpointManager(comm::Union{Communicator,Nothing}, root::AbstractString; keep_last::Integer = 0)
    out = Ref{Ptr{L.dsd_checkpoint_manager}}(C_NULL)
    checked(L.dsd_checkpoint_manager_new, _ptr(comm), String(root), Int32(keep_last), out)
    return CheckpointManager(out[])
end

CheckpointManager(f::Function, comm, root::AbstractString; kw...) =
    _with(f, CheckpointManager(comm, root; kw...))

_ptr(m::CheckpointManager) = m.ptr == C_NULL ? _closed("CheckpointManager") : m.ptr

function Base.close(m::CheckpointManager)
    if m.ptr != C_NULL
        p, m.ptr = m.ptr, Ptr{L.dsd_checkpoint_manager}(C_NULL)
        L.dsd_checkpoint_manager_free(p)  # waits for its save in flight
    end
    return nothing
end

function save(m::CheckpointManager, sd::StateDict, step::Integer; kw...)
    checked(L.dsd_checkpoint_manager_save, _ptr(m), _ptr(sd), Int64(step), _save_options(values(kw)))
    return nothing
end

function save_async(m::CheckpointManager, sd::StateDict, step::Integer; kw...)
    out = Ref{Ptr{L.dsd_future}}(C_NULL)
    checked(L.dsd_checkpoint_manager_save_async, _ptr(m), _ptr(sd), Int64(step),
        _save_options(values(kw)), out)
    return SaveFuture(out[])
end

"The newest complete step, or `nothing`."
function latest_step(m::CheckpointManager)
    found, step = Ref{Bool}(false), Ref{Int64}(0)
    checked(L.dsd_checkpoint_manager_latest_step, _ptr(m), found, step)
    return found[] ? Int(step[]) : nothing
end

"Loads the newest complete step into `sd` in place; returns the step, or `nothing` (untouched)."
function load_latest!(m::CheckpointManager, sd::StateDict; kw...)
    found, step = Ref{Bool}(false), Ref{Int64}(0)
    checked(L.dsd_checkpoint_manager_load_latest, _ptr(m), _ptr(sd), _load_options(kw), found, step)
    return found[] ? Int(step[]) : nothing
end

# ----------------------------------------------------------------------------------------
# Formats

"The format at `path`: :dsd, :dcp, :torch or :safetensors."
function format_detect(path::AbstractString)
    out = Ref{Int32}(0)
    checked(L.dsd_format_detect, String(path), out)
    return Dict(L.DSD_FORMAT_DSD => :dsd, L.DSD_FORMAT_DCP => :dcp, L.DSD_FORMAT_TORCH => :torch,
        L.DSD_FORMAT_SAFETENSORS => :safetensors)[out[]]
end

_convert_options(kw) = _opts(L.dsd_format_convert_options, L.dsd_format_convert_options_init,
    values(kw))

"Converts what is at `src` into `dst` in format `to` (:dsd, :dcp, :torch, :safetensors)."
function format_convert(src::AbstractString, dst::AbstractString, to::Symbol; kw...)
    code = Dict(:dsd => L.DSD_FORMAT_DSD, :dcp => L.DSD_FORMAT_DCP, :torch => L.DSD_FORMAT_TORCH,
        :safetensors => L.DSD_FORMAT_SAFETENSORS)[to]
    checked(L.dsd_format_convert, String(src), String(dst), code, _convert_options(kw))
    return nothing
end

"Writes `sd` as a torch.save file that `torch.load(weights_only=True)` reads."
function torch_save_export(sd::StateDict, path::AbstractString; kw...)
    checked(L.dsd_torch_save_export, _ptr(sd), String(path), _convert_options(kw))
    return nothing
end

function torch_save_import(path::AbstractString)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_torch_save_import, String(path), out)
    return StateDict(out[])
end

"Writes `sd` as a consolidated Hugging Face safetensors directory."
function safetensors_export(sd::StateDict, dir::AbstractString; kw...)
    checked(L.dsd_safetensors_export, _ptr(sd), String(dir), _convert_options(kw))
    return nothing
end

function safetensors_import(path::AbstractString)
    out = Ref{Ptr{L.dsd_state_dict}}(C_NULL)
    checked(L.dsd_safetensors_import, String(path), out)
    return StateDict(out[])
end

end # module Dsd
