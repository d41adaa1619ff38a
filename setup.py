"""Builds rmsprop_fused's C++/CUDA extension.

Three shared objects, all optional at run time (the package falls back to Triton or plain
PyTorch, with one warning, when they are missing or were built against another torch):

  rmsprop_fused._C             the op rmsprop_fused::rmsprop_ with its CPU kernel, plus the CUDA
                               kernel whenever nvcc and a CUDA build of torch are found. Whether a
                               GPU is present does not matter: a build machine often has none.
  rmsprop_fused._cuda_on_host  the CUDA kernel's own source compiled for the host, driven block
                               by block and thread by thread, so the tests check the GPU code path
                               on machines without a GPU (tests/test_cuda_kernel_on_host.py).

Environment switches:
  RMSPROP_FUSED_BUILD_EXTENSION=0   build nothing (pure Python: reference and Triton backends)
  RMSPROP_FUSED_BUILD_CUDA=0        skip the CUDA kernel
  TORCH_CUDA_ARCH_LIST              CUDA architectures; default "8.0;9.0+PTX" when no GPU is visible
  MAX_JOBS                          parallel compile jobs (ninja; without ninja the sources
                                    compile one after another, and setup.py warns)
"""

import glob
import json
import os
import shutil
import subprocess
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100; PTX lets newer GPUs JIT-compile the kernel


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


def find_cuda_home():
    """CUDA_HOME if set; else the toolkit of the nvcc on PATH, links resolved, or /usr/local/cuda:
    the first that has the CUDA headers. (torch's own guess takes /usr/local for a
    /usr/local/bin/nvcc wrapper, and the link then fails with `cannot find -lcudart`.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


def extensions_and_cmdclass():
    if not env_flag("RMSPROP_FUSED_BUILD_EXTENSION", True):
        print("rmsprop_fused: RMSPROP_FUSED_BUILD_EXTENSION=0, building no extension")
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # read by torch.utils.cpp_extension on import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available

    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    build_cuda = env_flag("RMSPROP_FUSED_BUILD_CUDA", True)
    why_no_cuda = None
    if not build_cuda:
        why_no_cuda = "RMSPROP_FUSED_BUILD_CUDA=0 at build time"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is not a CUDA build"
    elif nvcc is None or not os.path.exists(nvcc):
        why_no_cuda = "nvcc was not found (set CUDA_HOME)"
    with_cuda = why_no_cuda is None

    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    if with_cuda and not arch_list:
        arch_list = visible_gpu_arch_list(torch)

    # The C++ standard is left to torch.utils.cpp_extension, which picks the one its headers need.
    # -fno-math-errno lets GCC vectorise sqrt and -fno-trapping-math lets it turn the options'
    # branches into blends (neither changes a value); -ffp-contract=off (and --fmad=false for nvcc)
    # keeps a * b + c as two roundings, one per operation of the update rule, so that every
    # backend (and every CPU clone) produces the same bits for the same inputs.
    # -fopenmp-simd honours `omp simd` (which the CPU kernel's main loop needs to be vectorised in
    # float64) without the OpenMP runtime, for builds of torch without OpenMP too.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp-simd"]
    nvcc_flags = ["-O3", "--fmad=false", "-lineinfo"]
    # at::parallel_for is a header template: with ATen's OpenMP backend it only runs in parallel
    # when the extension itself is compiled with OpenMP.
    link_flags = []
    if torch._C.has_openmp:
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(HERE, "csrc")]

    sources = ["csrc/python_entry.cpp", "csrc/rmsprop_op.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        main = CUDAExtension(
            "rmsprop_fused._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        print(f"rmsprop_fused: building without the CUDA kernel: {why_no_cuda}")
        main = CppExtension(
            "rmsprop_fused._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    extensions = [main]
    host_sources = sorted(glob.glob("csrc/cuda_on_host/*.cpp"))
    if host_sources:
        # The host build instantiates every CUDA kernel for the tests, so it is compiled for
        # compile time: -O1 (its loops need no vectorising) and no debug info (-g comes from
        # Python's CFLAGS), which halve it; -ffp-contract=off keeps one rounding per operation,
        # the bits the GPU computes, at any -O level.
        host_flags = ["-O1", "-g0", "-fno-math-errno", "-ffp-contract=off"]
        extensions.append(
            CppExtension(
                "rmsprop_fused._cuda_on_host",
                host_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": host_flags},
            )
        )

    build_info = {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda": with_cuda,
        "why_no_cuda": why_no_cuda,
        "cuda_arch_list": arch_list,
        "nvcc_version": nvcc_version(nvcc) if with_cuda else None,
    }

    class BuildWithInfo(BuildExtension):
        """Writes _build_info.json beside the shared objects. The package reads it before loading
        them, so a torch upgraded under an old build is detected without importing the stale .so."""

        def build_extensions(self):
            super().build_extensions()
            # setuptools builds into build/lib even for --inplace, then copies to the source tree.
            self.info_path = os.path.join(os.path.dirname(self.get_ext_fullpath("rmsprop_fused._C")), "_build_info.json")
            with open(self.info_path, "w") as f:
                json.dump(build_info, f, indent=1)

        def copy_extensions_to_source(self):  # --inplace and editable installs
            super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir("rmsprop_fused")
            self.copy_file(self.info_path, os.path.join(package_dir, "_build_info.json"))

        def get_outputs(self):
            outputs = super().get_outputs()
            info_path = getattr(self, "info_path", None)
            return outputs + [info_path] if info_path else outputs

    use_ninja = is_ninja_available()
    if not use_ninja:
        # pip shows a build's output only with -v, so the README says this too.
        n_sources = sum(len(ext.sources) for ext in extensions)
        warnings.warn(
            f"rmsprop_fused: ninja was not found, so the {n_sources} sources compile one after another "
            "and MAX_JOBS is ignored (`pip install ninja` makes the build parallel)"
        )
    return extensions, {"build_ext": BuildWithInfo.with_options(use_ninja=use_ninja)}


def visible_gpu_arch_list(torch) -> str:
    """The architectures torch.utils.cpp_extension compiles for when TORCH_CUDA_ARCH_LIST is unset
    and a GPU is visible (_get_cuda_arch_flags): the capabilities of the visible GPUs, lowest
    first, the highest also as PTX. Recorded with its +PTX, so that _extension accepts a newer GPU
    that the PTX runs on."""
    # torch clamps each capability to the highest sm_ its own build has (what its nvcc can target)
    built = [arch.split("_")[1] for arch in torch.cuda.get_arch_list() if arch.startswith("sm_")]
    highest = max((int(sm[:-1]), int(sm[-1])) for sm in (a.rstrip("a") for a in built))
    capabilities = sorted({min(highest, torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    entries = [f"{major}.{minor}" for major, minor in capabilities]
    entries[-1] += "+PTX"
    return ";".join(entries)


def nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip().splitlines()[-1]


ext_modules, cmdclass = extensions_and_cmdclass()
# package_dir names the checkout's root as where the packages live. An editable install
# (`pip install -e .`) then puts that root on sys.path, as `setup.py develop` did, instead of
# setuptools' import hook, which also resolves `rmsprop_fused._C` for a copy of the package
# imported from elsewhere, finding the checkout's extension for it (the extension-loading tests
# run such copies).
setup(ext_modules=ext_modules, cmdclass=cmdclass, package_dir={"": "."})
