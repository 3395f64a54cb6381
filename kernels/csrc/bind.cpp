// The per-step half of a prepared multi-tensor launch (kernels/backends/cpu.py,
// PreparedLaunch.bind): check a step_batch's items against the layout they were prepared for
// and write their gradients' addresses into the launch's table, in one C loop. In Python the
// same checks and addresses cost ~1 us per tensor, as much as stepping a 10k-element tensor
// that sits in cache. Built apart from the kernels (it needs Python.h and is loaded with the
// GIL held, ctypes.PyDLL); without it the Python loop does the same.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>

namespace {

// A shape equal to the prepared one, compared without running Python code (an __eq__ could
// change the items under the loop's borrowed references): tuples of exact ints only.
bool same_shape(PyObject* shape, PyObject* want) {
  if (shape == want) return true;
  if (!PyTuple_CheckExact(shape) || !PyTuple_CheckExact(want)) return false;
  const Py_ssize_t n = PyTuple_GET_SIZE(shape);
  if (n != PyTuple_GET_SIZE(want)) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* a = PyTuple_GET_ITEM(shape, i);
    PyObject* b = PyTuple_GET_ITEM(want, i);
    if (a == b) continue;
    if (!PyLong_CheckExact(a) || !PyLong_CheckExact(b)) return false;
    int over_a = 0, over_b = 0;
    const long long x = PyLong_AsLongLongAndOverflow(a, &over_a);
    const long long y = PyLong_AsLongLongAndOverflow(b, &over_b);
    if (over_a || over_b || x != y) return false;
  }
  return true;
}

}  // namespace

extern "C" {

// items: a list or tuple of (name, shape, param, grad). Item k matches when its param is the
// very object prepared (ids[k], kept alive by the caller) and writable, its shape equals
// shapes[k], and its grad is C-contiguous float32 of sizes[k] elements. Param and grad must
// be exactly `array_type` (numpy.ndarray, whose buffer export is C: no Python code runs in
// this loop, so the borrowed references stay valid); anything else is left to Python.
// Returns -1 when every item matches (each grad's address is then in
// table[k * stride + col]), else the index of the first that does not: the caller's Python
// path then says why (or finds the layout changed). Never raises.
Py_ssize_t stepd_bind_grads(PyObject* items, PyObject* array_type, const int64_t* ids,
                            PyObject* shapes, const int64_t* sizes, int64_t* table,
                            int64_t stride, int64_t col) {
  if (!PyList_Check(items) && !PyTuple_Check(items)) return 0;
  if (!PyType_Check(array_type) || !PyTuple_Check(shapes)) return 0;
  PyTypeObject* type = reinterpret_cast<PyTypeObject*>(array_type);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  if (n != PyTuple_GET_SIZE(shapes)) return 0;
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* item = PySequence_Fast_GET_ITEM(items, k);
    if ((!PyTuple_Check(item) && !PyList_Check(item)) || PySequence_Fast_GET_SIZE(item) != 4)
      return k;
    PyObject* shape = PySequence_Fast_GET_ITEM(item, 1);
    PyObject* param = PySequence_Fast_GET_ITEM(item, 2);
    PyObject* grad = PySequence_Fast_GET_ITEM(item, 3);
    if (reinterpret_cast<intptr_t>(param) != ids[k] || Py_TYPE(param) != type ||
        Py_TYPE(grad) != type || !same_shape(shape, PyTuple_GET_ITEM(shapes, k)))
      return k;
    Py_buffer view;
    if (PyObject_GetBuffer(param, &view, PyBUF_WRITABLE) != 0) {  // made read-only since
      PyErr_Clear();
      return k;
    }
    PyBuffer_Release(&view);
    if (PyObject_GetBuffer(grad, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
      PyErr_Clear();
      return k;
    }
    // "f": native float32 (a byte-swapped one exports "<f" or ">f" and is not float32)
    const bool ok = view.itemsize == 4 && view.format != nullptr &&
                    std::strcmp(view.format, "f") == 0 && view.len == 4 * sizes[k];
    table[k * stride + col] = reinterpret_cast<int64_t>(view.buf);
    PyBuffer_Release(&view);
    if (!ok) return k;
  }
  return -1;
}

}  // extern "C"
