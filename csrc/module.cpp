// Python module kdfast._C. Importing it loads this shared library, whose static TORCH_LIBRARY
// registrations add the kdfast ops to torch.ops; the ops need no Python bindings of their own.
#include <Python.h>

static struct PyModuleDef kdfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

extern "C" PyObject* PyInit__C(void) {
  return PyModule_Create(&kdfast_module);
}
