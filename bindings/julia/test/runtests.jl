# The binding's own tests, for a machine with Julia (`julia --project=bindings/julia -e
# 'using Pkg; Pkg.test()'` with DSD_LIBRARY set). On the dsd CI machines, which have no Julia,
# tests/julia checks the binding statically and runs the example's C ABI call sequence.
using Dsd
using Test

const L = Dsd.LibDsd

@testset "Dsd" begin
    @testset "library" begin
        @test L.dsd_abi_version() >> 16 == L.DSD_ABI_VERSION_MAJOR
        @test !isempty(Dsd.version())
    end

    @testset "errors carry code, message and context" begin
        sd = Dsd.StateDict("a" => 1)
        @test_throws KeyError sd["b"]
        err = try
            Dsd.checkpoint_load_full(joinpath(mktempdir(), "absent"))
        catch e
            e
        end
        @test err isa DsdError
        @test err.code == L.DSD_E_NOT_FOUND
        @test err.name == "not_found"
        @test occursin("absent", err.message)
        close(sd)
    end

    @testset "column-major rule: reversed shape, no copy" begin
        W = Float32[1 2 3; 4 5 6]  # Julia (2, 3)
        @test Dsd.torch_shape(W) == (3, 2)
        t = Dsd.Tensor(W)
        @test size(t) == (3, 2)
        @test Dsd.info(t).data == Ptr{Cvoid}(pointer(W))
        @test Array(t) == W
        v = view(W, 1, :)  # a strided view: strides reversed too
        tv = Dsd.Tensor(v)
        @test size(tv) == (3,)
        close(t)
        close(tv)
        @test Dsd.pinned_count() == 0
    end

    @testset "state dict values" begin
        sd = Dsd.StateDict("i" => 3, "x" => 1.5, "s" => "hi", "b" => true, "n" => nothing,
            "t" => (1, 2), "l" => Any["a", 2], "d" => ["k" => 1], "bytes" => Dsd.Bytes(UInt8[1, 2]))
        @test sd["i"] === Int64(3)
        @test sd["x"] === 1.5
        @test sd["s"] == "hi"
        @test sd["b"] === true
        @test sd["n"] === nothing
        @test Dsd.todict(sd["d"]) == ["k" => 1]
        @test sd["bytes"].data == UInt8[1, 2]
        @test keys(sd) == ["i", "x", "s", "b", "n", "t", "l", "d", "bytes"]
        close(sd)
    end

    @testset "model, optimizer, save, load, manager" begin
        root = mktempdir()
        W, b = rand(Float32, 4, 8), rand(Float32, 8)
        m1, v1, step = zero(W), zero(W), fill(0.0f0)
        Dsd.Communicator() do comm
            model = Dsd.Model(comm, "fc.weight" => W, "fc.bias" => b; class_name = "Net")
            opt = Dsd.Optimizer(model)
            group = Dsd.add_param_group!(opt, ["fc.weight", "fc.bias"]; lr = 0.1)
            Dsd.set_param_state!(opt, "fc.weight", "step" => step, "exp_avg" => m1, "exp_avg_sq" => v1)
            msd, osd = Dsd.get_state_dict(model, opt)
            @test keys(msd) == ["fc.weight", "fc.bias"]
            @test size(msd["fc.weight"]) == (8, 4)
            state = Dsd.StateDict("model" => msd, "optim" => osd)
            Dsd.checkpoint_save(comm, state, joinpath(root, "ckpt"))
            Dsd.checkpoint_verify(joinpath(root, "ckpt"))
            saved = copy(W)
            W .= 0
            keys_ = Dsd.checkpoint_load(comm, state, joinpath(root, "ckpt"))
            @test isempty(keys_.missing)
            @test W == saved

            Dsd.AsyncCheckpointer(comm) do ac
                f = Dsd.checkpoint_save_async(ac, state, joinpath(root, "async"))
                t = @async wait(f)  # other tasks run while the save writes
                wait(t)
                @test isready(f)
                close(f)
            end
            Dsd.CheckpointManager(comm, joinpath(root, "mgr"); keep_last = 1) do mgr
                @test Dsd.latest_step(mgr) === nothing
                Dsd.save(mgr, state, 1)
                wait(Dsd.save_async(mgr, state, 2))
                @test Dsd.latest_step(mgr) == 2
                W .= 0
                @test Dsd.load_latest!(mgr, state) == 2
                @test W == saved
            end
            full = Dsd.checkpoint_load_full(joinpath(root, "ckpt"); keys = ["model"])
            @test Array(full["model"]["fc.weight"]) == saved  # nested as saved; Julia (4, 8)
            foreach(close, (full, state, msd, osd, opt, model))
        end
        @test Dsd.pinned_count() == 0
    end

    @testset "lazily created optimizer state (materialize callback)" begin
        W = rand(Float32, 3, 2)
        created = String[]
        moments = Dict{String,Any}()
        model = Dsd.Model(nothing, "w" => W)
        opt = Dsd.Optimizer(model)
        Dsd.add_param_group!(opt, ["w"]; lr = 0.1)
        Dsd.set_materialize!(opt) do o, names
            for n in names
                push!(created, n)
                moments[n] = (fill(0.0f0), zero(W))
                Dsd.set_param_state!(o, n, "step" => moments[n][1], "exp_avg" => moments[n][2])
            end
        end
        osd = Dsd.get_optimizer_state_dict(model, opt)
        @test created == ["w"]
        @test haskey(osd["state"], "w")
        foreach(close, (osd, opt, model))
    end

    @testset "a closed root is an ArgumentError, not a crash" begin
        c = Dsd.Communicator()
        close(c)
        @test_throws ArgumentError Dsd.rank(c)
        close(c)  # twice is fine
    end

    @testset "the example trains, saves and resumes bitwise" begin
        include(joinpath(@__DIR__, "..", "examples", "train_mlp.jl"))
        @test main(mktempdir())
    end
end
