# binding.gyp: the portable CPU addon that `npm install` builds when no prebuild matches and that
# prebuildify packs. No -march flags anywhere: native/cpu/*.cc is compiled three times (scalar, avx2,
# avx512 static libraries, told apart by BTS_ISA_LEVEL) and the level is picked at run time.
# Source lists are globbed so that a new op file needs no edit here.
{
  "variables": {
    "bts_cflags": ["-O3", "-std=c++17", "-fexceptions", "-fno-math-errno", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"],
    "bts_cpu_sources": ["<!@(node -p \"require('fs').readdirSync('native/cpu').filter(f=>f.endsWith('.cc')).map(f=>'native/cpu/'+f).join(' ')\")"]
  },
  "target_defaults": {
    "include_dirs": ["native/include"],
    "cflags!": ["-fno-exceptions"],
    "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17", "-std=gnu++20"],
    "cflags_cc": ["<@(bts_cflags)"],
    "xcode_settings": {
      "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
      "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
      "OTHER_CPLUSPLUSFLAGS": ["<@(bts_cflags)"]
    },
    "msvs_settings": {"VCCLCompilerTool": {"ExceptionHandling": 1}}
  },
  "targets": [
    {"target_name": "bts_cpu_scalar", "type": "static_library", "sources": ["<@(bts_cpu_sources)"], "defines": ["BTS_ISA_LEVEL=1"]},
    {"target_name": "bts_cpu_avx2", "type": "static_library", "sources": ["<@(bts_cpu_sources)"], "defines": ["BTS_ISA_LEVEL=2"]},
    {"target_name": "bts_cpu_avx512", "type": "static_library", "sources": ["<@(bts_cpu_sources)"], "defines": ["BTS_ISA_LEVEL=3"]},
    {
      "target_name": "bts",
      "sources": [
        "<!@(node -p \"['core','reference','ops','engine','binding'].flatMap(d=>require('fs').readdirSync('native/'+d).filter(f=>f.endsWith('.cc')).map(f=>'native/'+d+'/'+f)).join(' ')\")"
      ],
      "dependencies": [
        "bts_cpu_scalar", "bts_cpu_avx2", "bts_cpu_avx512",
        "<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"
      ],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "NODE_API_NO_EXTERNAL_BUFFERS_ALLOWED"],
      "libraries": ["-lpthread"]
    }
  ]
}
