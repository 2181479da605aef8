# KilnConfig.cmake — compile Kiln models into C libraries at build time.
#
#   find_package(Kiln CONFIG REQUIRED PATHS /path/to/kiln/cmake)
#   kiln_add_model(<target> MODEL <model.gguf | hf-dir> [PASSES <pass>...] [THREADS <n>] [OPT_LEVEL <0-3>]
#                  [TARGET cpu | x86_64-unknown-linux-gnu:x86-64-v3 ...] [SHARED])
#   target_link_libraries(my_program PRIVATE <target>)
#
# kiln_add_model runs `kiln compile MODEL --emit lib -o <build>/kiln/<target>` as a build step (rerun only
# when the model files or the kiln executable change) and defines <target>, an imported library of the
# result: libkiln_model.a (or .so with SHARED), its header kiln_model.h on the include path, and two
# compile definitions for its users: KILN_MODEL_WEIGHTS (the weights.bin path, a string) and
# KILN_MODEL_THREADS (THREADS, default 0 = one thread per core).
#
# The kiln executable is KILN_EXECUTABLE (cache variable), else `kiln` found through $KILN or PATH. It
# needs libkiln_capi.a beside it (`cargo build --release -p kiln -p kiln-capi` puts both in target/release).
include_guard(GLOBAL)

find_program(KILN_EXECUTABLE NAMES kiln HINTS ENV KILN DOC "the kiln compiler")
find_package(Threads REQUIRED)

function(kiln_add_model target)
  cmake_parse_arguments(PARSE_ARGV 1 KILN "SHARED" "MODEL;THREADS;OPT_LEVEL;TARGET" "PASSES")
  if(KILN_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "kiln_add_model(${target}): unknown arguments: ${KILN_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT KILN_MODEL)
    message(FATAL_ERROR "kiln_add_model(${target}): MODEL <path> is required")
  endif()
  if(NOT KILN_EXECUTABLE OR NOT EXISTS "${KILN_EXECUTABLE}")
    message(FATAL_ERROR "kiln_add_model(${target}): the kiln executable was not found; set KILN_EXECUTABLE "
                        "or $KILN, or put kiln on PATH")
  endif()
  get_filename_component(model "${KILN_MODEL}" ABSOLUTE)
  if(NOT EXISTS "${model}")
    message(FATAL_ERROR "kiln_add_model(${target}): model ${model} does not exist")
  endif()
  if(IS_DIRECTORY "${model}")
    file(GLOB model_files "${model}/*.json" "${model}/*.safetensors")
  else()
    set(model_files "${model}")
  endif()
  if(NOT DEFINED KILN_THREADS)
    set(KILN_THREADS 0)
  endif()

  set(out "${CMAKE_CURRENT_BINARY_DIR}/kiln/${target}")
  set(args compile "${model}" --emit lib -o "${out}")
  if(KILN_PASSES)
    list(JOIN KILN_PASSES "," passes)
    list(APPEND args --passes "${passes}")
  endif()
  if(KILN_TARGET)
    list(APPEND args --target "${KILN_TARGET}")
  endif()
  if(DEFINED KILN_OPT_LEVEL)
    list(APPEND args -O "${KILN_OPT_LEVEL}")
  endif()
  if(KILN_SHARED)
    set(lib "${out}/libkiln_model.so")
    set(kind SHARED)
  else()
    set(lib "${out}/libkiln_model.a")
    set(kind STATIC)
  endif()
  set(outputs "${out}/libkiln_model.a" "${out}/libkiln_model.so" "${out}/kiln_model.h" "${out}/weights.bin"
              "${out}/manifest.json")
  add_custom_command(
    OUTPUT ${outputs}
    COMMAND "${KILN_EXECUTABLE}" ${args}
    DEPENDS ${model_files} "${KILN_EXECUTABLE}"
    COMMENT "kiln: compiling ${KILN_MODEL} into ${out}"
    VERBATIM)
  add_custom_target(${target}_kiln_compile DEPENDS ${outputs})

  # The include directory must exist when the target is defined; kiln fills it at build time.
  file(MAKE_DIRECTORY "${out}")
  add_library(${target} ${kind} IMPORTED GLOBAL)
  set_target_properties(${target} PROPERTIES
    IMPORTED_LOCATION "${lib}"
    INTERFACE_INCLUDE_DIRECTORIES "${out}"
    INTERFACE_COMPILE_DEFINITIONS "KILN_MODEL_WEIGHTS=\"${out}/weights.bin\";KILN_MODEL_THREADS=${KILN_THREADS}")
  if(KILN_SHARED)
    set_target_properties(${target} PROPERTIES IMPORTED_SONAME libkiln_model.so)
  else()
    # The static library holds Kiln's Rust runtime, which needs these system libraries.
    set_target_properties(${target} PROPERTIES INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m")
  endif()
  add_dependencies(${target} ${target}_kiln_compile)
endfunction()
