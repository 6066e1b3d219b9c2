# CuArrays handed to dsd without copying: loaded by Julia when both Dsd and CUDA are.
#
# A CuArray is pinned (kept alive, so CUDA.jl does not free or reuse its memory) until dsd's
# release callback runs, exactly as an Array is. dsd works on the device's default stream:
# call `CUDA.synchronize()` before a save or load, so every kernel that writes the arrays has
# finished (and after a load before reading them on another stream).
module DsdCUDAExt

using CUDA
using Dsd

const L = Dsd.LibDsd

function Dsd._blob(A::CUDA.StridedCuArray)
    ordinal = CUDA.deviceid(CUDA.device(A))  # 0-based, as DLPack's device_id
    data = Ptr{Cvoid}(UInt(pointer(A)))      # a CuPtr, as an address
    return data, L.dsd_device(L.DSD_DEVICE_CUDA, Int32(ordinal))
end

"""
    Dsd.Communicator(nccl_comm::Ptr, stream::CuStream, rank, size)

The NCCL form with a CUDA.jl stream (e.g. `CUDA.stream()`); `nccl_comm` is NCCL.jl's
`ncclComm_t` (`comm.handle`).
"""
function Dsd.Communicator(nccl_comm::Ptr, stream::CUDA.CuStream, rank::Integer, size::Integer; kw...)
    return Dsd.Communicator(nccl_comm, Ptr{Cvoid}(stream.handle), rank, size; kw...)
end

end # module DsdCUDAExt
