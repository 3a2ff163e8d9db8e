/*
 * vas._native -- thin, checked wrappers of the Linux syscalls vas needs.
 *
 * A vas segment is a memfd (memfd_create, fallocate, ftruncate) mapped
 * MAP_SHARED (mmap -> Mapping, Mapping.madvise).  chunk_hashes finds the
 * changed chunks of a segment cheaply, and the uffd_* functions let an agent
 * resolve (or poison) the page faults of a client's mapping with userfaultfd,
 * or write-protect a writer's mapping whose lock it revokes.  pagemap_scan
 * lets a remote writer find (and write-protect again) the pages it wrote
 * since its last sync.  process_vm_readv lets an agent copy a local writer's
 * bytes out of the writer's memory into a segment it maps itself.
 *
 * House rules: C does syscalls, Python does policy.  Every function wraps
 * one syscall (or ioctl); its arguments are checked before the call and bad
 * ones raise ValueError with stable messages; the GIL is released around the
 * syscall, which is retried on EINTR after PyErr_CheckSignals(); a failure
 * raises OSError from errno (so EEXIST is FileExistsError, EACCES is
 * PermissionError, EAGAIN is BlockingIOError, ...).  Linux only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
/* UFFDIO_POISON (Linux 6.6): older userspace headers lack it. */
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
/* Write-protect of shmem (Linux 5.19) and user-mode-only uffds (5.11), for
 * building against older userspace headers; the kernel refuses what it lacks. */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_SIGBUS
#define UFFD_FEATURE_SIGBUS (1 << 7)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
/* Write-protect faults the kernel resolves itself (Linux 6.7), and the
 * PAGEMAP_SCAN ioctl of /proc/PID/pagemap (6.7): older userspace headers lack
 * them. */
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

#ifndef UFFDIO_WRITEPROTECT
struct uffdio_writeprotect {
    struct uffdio_range range;
    __u64 mode;
};
#define UFFDIO_WRITEPROTECT_MODE_WP ((__u64)1 << 0)
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ((__u64)1 << 1)
#define UFFDIO_WRITEPROTECT _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)
#endif

#define MFD_NAME_MAX 249 /* NAME_MAX - strlen("memfd:") */

static size_t page_size;

/*
 * Run `call` with the GIL released, retrying while it fails with EINTR and
 * no signal handler raised.  errno is preserved for the caller.
 */
#define SYSCALL(res, fail, call)                                        \
    do {                                                                \
        int err_;                                                       \
        for (;;) {                                                      \
            Py_BEGIN_ALLOW_THREADS                                      \
            (res) = (call);                                             \
            err_ = errno;                                               \
            Py_END_ALLOW_THREADS                                        \
            if ((res) != (fail) || err_ != EINTR ||                     \
                PyErr_CheckSignals() < 0)                               \
                break;                                                  \
        }                                                               \
        errno = err_;                                                   \
    } while (0)

/* Raise OSError from errno, unless a signal handler already raised. */
static PyObject *
errno_error(void)
{
    if (PyErr_Occurred())
        return NULL;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *
value_error(const char *msg)
{
    PyErr_SetString(PyExc_ValueError, msg);
    return NULL;
}

/* "O&" converter: a Python int in [0, 2**64) to uint64_t (addresses, flags). */
static int
conv_u64(PyObject *obj, void *out)
{
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL)
        return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *(uint64_t *)out = v;
    return 1;
}

static int
page_aligned(uint64_t v)
{
    return (v & (page_size - 1)) == 0;
}

/* Checks shared by the userfaultfd range wrappers; 0 and ValueError if bad. */
static int
check_range(uint64_t address, Py_ssize_t length)
{
    if (!page_aligned(address)) {
        value_error("address must be a multiple of the page size");
        return 0;
    }
    if (length <= 0 || !page_aligned((uint64_t)length)) {
        value_error("length must be a positive multiple of the page size");
        return 0;
    }
    if (address > UINT64_MAX - (uint64_t)length) {
        value_error("address + length overflows");
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* memfd, fallocate, ftruncate                                              */

PyDoc_STRVAR(memfd_create_doc,
"memfd_create($module, /, name, flags=MFD_CLOEXEC)\n--\n\n"
"memfd_create(2): create an anonymous shared-memory file.\n\n"
"name: str, at most 249 bytes of UTF-8 (shown in /proc/PID/fd as\n"
"'/memfd:NAME'); flags: MFD_* bits.  Returns the new fd (int).\n"
"Raises ValueError('memfd name too long'), OSError.");

static PyObject *
vas_memfd_create(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "flags", NULL};
    const char *name;
    int flags = MFD_CLOEXEC, fd;

    /* "s" gives UTF-8 and rejects embedded NULs */
    if (!PyArg_ParseTupleAndKeywords(args, kw, "s|i:memfd_create", kwlist,
                                     &name, &flags))
        return NULL;
    if (strlen(name) > MFD_NAME_MAX)
        return value_error("memfd name too long");
    SYSCALL(fd, -1, memfd_create(name, (unsigned int)flags));
    if (fd == -1)
        return errno_error();
    return PyLong_FromLong(fd);
}

/*
 * fallocate(2) on a helper thread at SCHED_IDLE: the kernel zeroes the pages
 * it allocates in the calling thread's context, so that thread's class is
 * what decides who yields.  A new thread (not the caller switching its own
 * class) because the caller is a Python thread: at SCHED_IDLE it would hold
 * or be handed the GIL while starved by a busy machine, stalling every
 * thread of the process; and an unprivileged thread may not switch back
 * from SCHED_IDLE.  The helper holds no lock the process shares (the file's
 * own inode lock only), blocks every signal (so no EINTR from a long
 * allocation) and ends with the call.
 */
struct idle_fallocate {
    int fd, mode;
    off_t offset, length;
    int result, error;
};

static void *
idle_fallocate_main(void *arg)
{
    struct idle_fallocate *call = arg;
    struct sched_param param = {0};

    if (sched_setscheduler(0, SCHED_IDLE, &param) == -1) {
        call->result = -1;
        call->error = errno;
        return NULL;
    }
    do
        call->result = fallocate(call->fd, call->mode, call->offset, call->length);
    while (call->result == -1 && errno == EINTR);
    call->error = errno;
    return NULL;
}

/* Run `call` on a helper thread at SCHED_IDLE and wait for it (GIL released);
 * -1 and errno on failure (of the thread's start, its class, or the call). */
static int
fallocate_idle(struct idle_fallocate *call)
{
    sigset_t all, old;
    pthread_t thread;
    int err;

    sigfillset(&all);
    Py_BEGIN_ALLOW_THREADS
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* the helper inherits it */
    err = pthread_create(&thread, NULL, idle_fallocate_main, call);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err == 0)
        err = pthread_join(thread, NULL);
    Py_END_ALLOW_THREADS
    if (err != 0) {
        errno = err;
        return -1;
    }
    errno = call->error;
    return call->result;
}

PyDoc_STRVAR(fallocate_doc,
"fallocate($module, /, fd, offset, length, mode=0, *, idle=False)\n--\n\n"
"fallocate(2): allocate (or with FALLOC_FL_PUNCH_HOLE free) the bytes\n"
"[offset, offset + length) of fd.  Allocating every page of a segment at\n"
"create means a later touch can never SIGBUS.\n\n"
"fd: int; offset, length: bytes; mode: FALLOC_FL_* bits; idle: run the\n"
"call on a helper thread of scheduling class SCHED_IDLE (it then gets only\n"
"CPU time no other thread of the machine wants; the caller waits for it).\n"
"Returns None.  The GIL is released (allocating GiBs takes a while).\n"
"Raises ValueError('offset must be >= 0' | 'length must be > 0' |\n"
"'offset + length overflows'), OSError (ENOSPC if memory is short).");

static PyObject *
vas_fallocate(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "offset", "length", "mode", "idle", NULL};
    int fd, mode = 0, idle = 0, r;
    long long offset, length;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iLL|i$p:fallocate", kwlist,
                                     &fd, &offset, &length, &mode, &idle))
        return NULL;
    if (offset < 0)
        return value_error("offset must be >= 0");
    if (length <= 0)
        return value_error("length must be > 0");
    if (offset > LLONG_MAX - length)
        return value_error("offset + length overflows");
    if (idle) {
        struct idle_fallocate call = {fd, mode, (off_t)offset, (off_t)length, 0, 0};
        r = fallocate_idle(&call);
    } else {
        SYSCALL(r, -1, fallocate(fd, mode, (off_t)offset, (off_t)length));
    }
    if (r == -1)
        return errno_error();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(ftruncate_doc,
"ftruncate($module, /, fd, length)\n--\n\n"
"ftruncate(2): set the size of fd to length bytes.  Returns None.\n"
"Raises ValueError('length must be >= 0'), OSError.");

static PyObject *
vas_ftruncate(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "length", NULL};
    int fd, r;
    long long length;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iL:ftruncate", kwlist,
                                     &fd, &length))
        return NULL;
    if (length < 0)
        return value_error("length must be >= 0");
    SYSCALL(r, -1, ftruncate(fd, (off_t)length));
    if (r == -1)
        return errno_error();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* process_vm_readv                                                         */

PyDoc_STRVAR(process_vm_readv_doc,
"process_vm_readv($module, /, pid, dst, address)\n--\n\n"
"process_vm_readv(2): copy len(dst) bytes from address in process pid's\n"
"memory into the writable buffer dst (one local and one remote iovec).\n\n"
"pid: int > 0; dst: a writable, C-contiguous buffer; address: int.\n"
"Returns the bytes copied, which may be fewer than asked (the remote range\n"
"ends in unmapped memory).  The GIL is released (a large copy takes a while).\n"
"Raises ValueError('pid must be > 0' | 'address + length overflows'),\n"
"OSError (ESRCH: no such process; EPERM: not allowed to read its memory;\n"
"EFAULT: address is not mapped in that process).");

static PyObject *
vas_process_vm_readv(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"pid", "dst", "address", NULL};
    int pid;
    Py_buffer dst;
    uint64_t address;
    ssize_t n;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iw*O&:process_vm_readv", kwlist,
                                     &pid, &dst, conv_u64, &address))
        return NULL;
    if (pid <= 0) {
        PyBuffer_Release(&dst);
        return value_error("pid must be > 0");
    }
    if ((uint64_t)dst.len > UINT64_MAX - address) {
        PyBuffer_Release(&dst);
        return value_error("address + length overflows");
    }
    struct iovec local = {.iov_base = dst.buf, .iov_len = (size_t)dst.len};
    struct iovec remote = {.iov_base = (void *)(uintptr_t)address,
                           .iov_len = (size_t)dst.len};
    SYSCALL(n, -1, process_vm_readv((pid_t)pid, &local, 1, &remote, 1, 0));
    PyBuffer_Release(&dst);
    if (n == -1)
        return errno_error();
    return PyLong_FromSsize_t(n);
}

/* ------------------------------------------------------------------------ */
/* Mapping                                                                  */

typedef struct {
    PyObject_HEAD
    void *addr;
    Py_ssize_t size;
    char writable;
    char closed;
    Py_ssize_t exports; /* live buffer exports */
    Py_ssize_t busy;    /* madvise calls running without the GIL */
    PyObject *weakreflist; /* weak references (callbacks run after munmap) */
} MappingObject;

static PyTypeObject MappingType;

static PyObject *
mapping_new(PyTypeObject *Py_UNUSED(type), PyObject *Py_UNUSED(args),
            PyObject *Py_UNUSED(kw))
{
    PyErr_SetString(PyExc_TypeError, "cannot create 'Mapping' instances");
    return NULL;
}

static void
mapping_dealloc(MappingObject *self)
{
    if (!self->closed) {
        void *addr = self->addr;
        size_t size = (size_t)self->size;
        self->closed = 1;
        Py_BEGIN_ALLOW_THREADS
        (void)munmap(addr, size);
        Py_END_ALLOW_THREADS
    }
    /* after munmap: a weakref callback may rely on the pages being gone */
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags)
{
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "mapping is closed");
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && !self->writable) {
        PyErr_SetString(PyExc_BufferError, "mapping is read-only");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr,
                          self->size, !self->writable, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
mapping_releasebuffer(MappingObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

static PyBufferProcs mapping_as_buffer = {
    (getbufferproc)mapping_getbuffer,
    (releasebufferproc)mapping_releasebuffer,
};

PyDoc_STRVAR(mapping_close_doc,
"close($self, /)\n--\n\n"
"munmap(2) the mapping.  A second close is a no-op.  Returns None.\n"
"Raises BufferError('cannot close mapping: N buffer(s) still exported')\n"
"while memoryviews/arrays of it are alive, BufferError('cannot close\n"
"mapping: N operation(s) in progress') while madvise runs in another thread.");

static PyObject *
mapping_close(MappingObject *self, PyObject *Py_UNUSED(ignored))
{
    void *addr;
    size_t size;
    int r;

    if (self->closed)
        Py_RETURN_NONE;
    if (self->exports > 0)
        return PyErr_Format(PyExc_BufferError,
                            "cannot close mapping: %zd buffer(s) still exported",
                            self->exports);
    if (self->busy > 0)
        return PyErr_Format(PyExc_BufferError,
                            "cannot close mapping: %zd operation(s) in progress",
                            self->busy);
    addr = self->addr;
    size = (size_t)self->size;
    self->closed = 1; /* before releasing the GIL: no second munmap */
    Py_BEGIN_ALLOW_THREADS
    r = munmap(addr, size);
    Py_END_ALLOW_THREADS
    if (r == -1)
        return errno_error();
    Py_RETURN_NONE;
}

/*
 * The advices a mapping takes: those that only change how its own pages are
 * read ahead, dropped, populated or inherited.  Others are refused, not passed
 * on: MADV_HWPOISON and MADV_SOFT_OFFLINE (allowed to root) take physical pages
 * out of service for the whole machine.
 */
static int
advice_allowed(int advice)
{
    switch (advice) {
    case MADV_NORMAL: case MADV_RANDOM: case MADV_SEQUENTIAL:
    case MADV_WILLNEED: case MADV_DONTNEED: case MADV_REMOVE:
    case MADV_DONTFORK: case MADV_DOFORK:
    case MADV_POPULATE_READ: case MADV_POPULATE_WRITE:
        return 1;
    default:
        return 0;
    }
}

PyDoc_STRVAR(mapping_madvise_doc,
"madvise($self, /, advice, offset=0, length=None)\n--\n\n"
"madvise(2) the bytes [offset, offset + length) of the mapping.\n\n"
"advice: one of MADV_NORMAL, RANDOM, SEQUENTIAL, WILLNEED, DONTNEED, REMOVE,\n"
"DONTFORK, DOFORK, POPULATE_READ, POPULATE_WRITE (the mmap module's or this\n"
"one's constants); offset: bytes from the start of the mapping, a\n"
"multiple of PAGE_SIZE; length: bytes, None for up to the end.  Returns\n"
"None.  The GIL is released (MADV_POPULATE_WRITE can take long).\n"
"Raises ValueError('mapping is closed' | 'advice N is not allowed' |\n"
"'offset must be a non-negative multiple of the page size' |\n"
"'length must be >= 0' |\n"
"'range [A, B) is outside the mapping of N bytes'), OSError.");

static PyObject *
mapping_madvise(MappingObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"advice", "offset", "length", NULL};
    int advice, r;
    Py_ssize_t offset = 0, length = 0;
    PyObject *length_obj = Py_None;
    char *start;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|nO:madvise", kwlist,
                                     &advice, &offset, &length_obj))
        return NULL;
    if (length_obj != Py_None) {
        length = PyNumber_AsSsize_t(length_obj, PyExc_OverflowError);
        if (length == -1 && PyErr_Occurred())
            return NULL;
    }
    /* checked after the conversions: an __index__ may have closed us */
    if (self->closed)
        return value_error("mapping is closed");
    if (!advice_allowed(advice))
        return PyErr_Format(PyExc_ValueError, "advice %d is not allowed", advice);
    if (offset < 0 || !page_aligned((uint64_t)offset))
        return value_error(
            "offset must be a non-negative multiple of the page size");
    if (length_obj == Py_None)
        length = offset <= self->size ? self->size - offset : 0;
    else if (length < 0)
        return value_error("length must be >= 0");
    /* both are < 2**63, so the sum cannot wrap a size_t */
    if ((size_t)offset + (size_t)length > (size_t)self->size)
        return PyErr_Format(PyExc_ValueError,
                            "range [%zu, %zu) is outside the mapping of %zu bytes",
                            (size_t)offset, (size_t)offset + (size_t)length,
                            (size_t)self->size);
    start = (char *)self->addr + offset;
    self->busy++; /* close() must not munmap under our feet */
    SYSCALL(r, -1, madvise(start, (size_t)length, advice));
    self->busy--;
    if (r == -1)
        return errno_error();
    Py_RETURN_NONE;
}

static PyObject *
mapping_enter(MappingObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self);
}

static PyObject *
mapping_exit(MappingObject *self, PyObject *Py_UNUSED(args))
{
    return mapping_close(self, NULL);
}

static PyObject *
mapping_repr(MappingObject *self)
{
    return PyUnicode_FromFormat("<vas._native.Mapping address=%p size=%zd "
                                "writable=%s%s>",
                                self->addr, self->size,
                                self->writable ? "True" : "False",
                                self->closed ? " closed" : "");
}

static PyObject *
mapping_get_address(MappingObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromVoidPtr(self->addr);
}

static PyGetSetDef mapping_getset[] = {
    {"address", (getter)mapping_get_address, NULL,
     "Start address of the mapping (int; kept after close).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define RO_MEMBER(name, type, doc) \
    {#name, type, offsetof(MappingObject, name), READONLY, doc}
static PyMemberDef mapping_members[] = {
    RO_MEMBER(size, T_PYSSIZET, "Length of the mapping in bytes (int)."),
    RO_MEMBER(writable, T_BOOL,
              "True if mapped PROT_READ|PROT_WRITE, False if PROT_READ."),
    RO_MEMBER(closed, T_BOOL, "True once close() has unmapped it."),
    RO_MEMBER(exports, T_PYSSIZET,
              "Number of live buffer exports (memoryviews, numpy arrays...)."),
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef mapping_methods[] = {
    {"close", (PyCFunction)mapping_close, METH_NOARGS, mapping_close_doc},
    {"madvise", (PyCFunction)(void (*)(void))mapping_madvise,
     METH_VARARGS | METH_KEYWORDS, mapping_madvise_doc},
    {"__enter__", (PyCFunction)mapping_enter, METH_NOARGS,
     "__enter__($self, /)\n--\n\nReturn self."},
    {"__exit__", (PyCFunction)mapping_exit, METH_VARARGS,
     "__exit__($self, *exc_info)\n--\n\nclose() the mapping."},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(mapping_doc,
"A MAP_SHARED mapping made by vas._native.mmap().\n\n"
"Exports its bytes through the buffer protocol (1-D, format 'B', read-only\n"
"unless writable), so memoryview(m) and numpy.frombuffer(m) are zero-copy.\n"
"close() (or the with statement, or garbage collection) unmaps it.  Weak\n"
"references are supported; their callbacks run after the pages are unmapped\n"
"(the buffer views of a mapping hold a reference to it, so weakref.finalize\n"
"on it runs once the last view is gone).");

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vas._native.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_repr = (reprfunc)mapping_repr,
    .tp_as_buffer = &mapping_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_weaklistoffset = offsetof(MappingObject, weakreflist),
    .tp_doc = mapping_doc,
    .tp_methods = mapping_methods,
    .tp_members = mapping_members,
    .tp_getset = mapping_getset,
    .tp_new = mapping_new,
};

static PyObject *
already_mapped(uint64_t address, uint64_t length)
{
    char msg[96];
    PyObject *args;

    PyOS_snprintf(msg, sizeof msg, "address range 0x%lx-0x%lx is already mapped",
                  (unsigned long)address, (unsigned long)(address + length));
    args = Py_BuildValue("(is)", EEXIST, msg);
    if (args != NULL) {
        PyErr_SetObject(PyExc_FileExistsError, args);
        Py_DECREF(args);
    }
    return NULL;
}

PyDoc_STRVAR(mmap_doc,
"mmap($module, /, fd, length, *, writable, offset=0, address=0, fixed=False,\n"
"     populate=False)\n--\n\n"
"mmap(2) length bytes of fd at offset, MAP_SHARED.  Returns a Mapping.\n\n"
"fd: int; length, offset: bytes, multiples of PAGE_SIZE; writable: bool,\n"
"PROT_READ|PROT_WRITE if true else PROT_READ (an fd opened O_RDONLY with\n"
"writable=True fails with PermissionError); address: int, 0 or a multiple\n"
"of PAGE_SIZE, only a hint unless fixed; fixed: map exactly at address\n"
"with MAP_FIXED_NOREPLACE, never replacing an existing mapping; populate:\n"
"add MAP_POPULATE (prefault now; the GIL is released).\n"
"Raises ValueError('length must be a positive multiple of the page size' |\n"
"'offset must be a non-negative multiple of the page size' | 'address must\n"
"be a multiple of the page size' | 'fixed mapping needs an address' |\n"
"'address + length overflows' | 'offset + length overflows'),\n"
"FileExistsError('address range 0xA-0xB is already mapped'), OSError.");

static PyObject *
vas_mmap(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "length", "writable", "offset", "address",
                             "fixed", "populate", NULL};
    int fd, writable = -1, fixed = 0, populate = 0, prot, flags;
    Py_ssize_t length;
    long long offset = 0;
    uint64_t address = 0;
    void *addr;
    MappingObject *m;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "in|$pLO&pp:mmap", kwlist,
                                     &fd, &length, &writable, &offset,
                                     conv_u64, &address, &fixed, &populate))
        return NULL;
    if (writable == -1) {
        PyErr_SetString(PyExc_TypeError,
                        "mmap() missing required keyword-only argument: "
                        "'writable'");
        return NULL;
    }
    if (length <= 0 || !page_aligned((uint64_t)length))
        return value_error("length must be a positive multiple of the page size");
    if (offset < 0 || !page_aligned((uint64_t)offset))
        return value_error(
            "offset must be a non-negative multiple of the page size");
    if (!page_aligned(address))
        return value_error("address must be a multiple of the page size");
    if (fixed && address == 0)
        return value_error("fixed mapping needs an address");
    if (address > UINT64_MAX - (uint64_t)length)
        return value_error("address + length overflows");
    if (offset > LLONG_MAX - length)
        return value_error("offset + length overflows");

    prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
    flags = MAP_SHARED;
    if (fixed)
        flags |= MAP_FIXED_NOREPLACE;
    if (populate)
        flags |= MAP_POPULATE;
    SYSCALL(addr, MAP_FAILED,
            mmap((void *)(uintptr_t)address, (size_t)length, prot, flags, fd,
                 (off_t)offset));
    if (addr == MAP_FAILED) {
        if (fixed && errno == EEXIST)
            return already_mapped(address, (uint64_t)length);
        return errno_error();
    }
    if (fixed && (uintptr_t)addr != address) {
        /* a kernel older than 4.17 took MAP_FIXED_NOREPLACE as a hint */
        (void)munmap(addr, (size_t)length);
        return already_mapped(address, (uint64_t)length);
    }
    m = (MappingObject *)MappingType.tp_alloc(&MappingType, 0);
    if (m == NULL) {
        (void)munmap(addr, (size_t)length);
        return NULL;
    }
    m->addr = addr;
    m->size = length;
    m->writable = (char)writable;
    m->closed = 0;
    m->exports = 0;
    m->busy = 0;
    m->weakreflist = NULL;
    return (PyObject *)m;
}

/* ------------------------------------------------------------------------ */
/* chunk_hashes: XXH64 (seed 0) of each chunk                               */

#define XXH_P1 0x9E3779B185EBCA87ULL
#define XXH_P2 0xC2B2AE3D27D4EB4FULL
#define XXH_P3 0x165667B19E3779F9ULL
#define XXH_P4 0x85EBCA77C2B2AE63ULL
#define XXH_P5 0x27D4EB2F165667C5ULL

static inline uint64_t
rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t
read64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return le64toh(v);
}

static inline uint32_t
read32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return le32toh(v);
}

static inline uint64_t
xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * XXH_P2;
    acc = rotl64(acc, 31);
    return acc * XXH_P1;
}

static inline uint64_t
xxh_merge(uint64_t h, uint64_t v)
{
    h ^= xxh_round(0, v);
    return h * XXH_P1 + XXH_P4;
}

/* XXH64 with seed 0, bit-exact with the reference implementation. */
static uint64_t
xxh64(const unsigned char *p, size_t len)
{
    size_t rem = len;
    uint64_t h;

    if (rem >= 32) {
        uint64_t v1 = XXH_P1 + XXH_P2, v2 = XXH_P2, v3 = 0, v4 = -XXH_P1;
        do {
            v1 = xxh_round(v1, read64(p));
            v2 = xxh_round(v2, read64(p + 8));
            v3 = xxh_round(v3, read64(p + 16));
            v4 = xxh_round(v4, read64(p + 24));
            p += 32;
            rem -= 32;
        } while (rem >= 32);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = XXH_P5;
    }
    h += (uint64_t)len;
    for (; rem >= 8; p += 8, rem -= 8) {
        h ^= xxh_round(0, read64(p));
        h = rotl64(h, 27) * XXH_P1 + XXH_P4;
    }
    if (rem >= 4) {
        h ^= (uint64_t)read32(p) * XXH_P1;
        h = rotl64(h, 23) * XXH_P2 + XXH_P3;
        p += 4;
        rem -= 4;
    }
    for (; rem > 0; p++, rem--) {
        h ^= (uint64_t)*p * XXH_P5;
        h = rotl64(h, 11) * XXH_P1;
    }
    h ^= h >> 33;
    h *= XXH_P2;
    h ^= h >> 29;
    h *= XXH_P3;
    h ^= h >> 32;
    return h;
}

PyDoc_STRVAR(chunk_hashes_doc,
"chunk_hashes($module, buffer, chunk_size, /)\n--\n\n"
"Hash each chunk_size-byte chunk of a C-contiguous buffer (the last chunk\n"
"may be shorter) with XXH64, seed 0.  XXH64 is a fast non-cryptographic\n"
"hash: use it to detect changed chunks, never for security.\n\n"
"buffer: any object with the buffer protocol (read access only);\n"
"chunk_size: bytes, a positive multiple of 8.  Returns bytes: the hashes as\n"
"little-endian uint64, 8 * ceil(len(buffer) / chunk_size) bytes.  The GIL\n"
"is released while hashing.\n"
"Raises ValueError('chunk_size must be a positive multiple of 8'),\n"
"BufferError/TypeError for a non-contiguous or non-buffer object.");

static PyObject *
vas_chunk_hashes(PyObject *Py_UNUSED(mod), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t chunk_size, nchunks;
    PyObject *out;

    if (!PyArg_ParseTuple(args, "y*n:chunk_hashes", &view, &chunk_size))
        return NULL;
    if (chunk_size <= 0 || chunk_size % 8 != 0) {
        PyBuffer_Release(&view);
        return value_error("chunk_size must be a positive multiple of 8");
    }
    nchunks = view.len / chunk_size + (view.len % chunk_size != 0);
    out = PyBytes_FromStringAndSize(NULL, nchunks * 8);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    {
        const unsigned char *data = view.buf;
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        size_t total = (size_t)view.len, cs = (size_t)chunk_size;

        Py_BEGIN_ALLOW_THREADS
        for (size_t off = 0; off < total; off += cs, dst += 8) {
            size_t n = total - off < cs ? total - off : cs;
            uint64_t h = htole64(xxh64(data + off, n));
            memcpy(dst, &h, 8);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return out;
}

/* ------------------------------------------------------------------------ */
/* userfaultfd                                                              */

PyDoc_STRVAR(userfaultfd_doc,
"userfaultfd($module, /, flags=os.O_CLOEXEC | os.O_NONBLOCK)\n--\n\n"
"userfaultfd(2): create a userfaultfd.  If the syscall fails with EPERM or\n"
"ENOSYS, open /dev/userfaultfd and ask it with USERFAULTFD_IOC_NEW instead.\n"
"flags: O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY bits (the last: only\n"
"faults of user code are reported; unprivileged processes may create such a\n"
"userfaultfd even where vm.unprivileged_userfaultfd is 0).  Returns the fd\n"
"(int).  The next call on it must be uffd_api().\n"
"Raises OSError (the syscall's error when /dev/userfaultfd is missing).");

static PyObject *
vas_userfaultfd(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"flags", NULL};
    int flags = O_CLOEXEC | O_NONBLOCK, fd, dev, err;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "|i:userfaultfd", kwlist,
                                     &flags))
        return NULL;
    SYSCALL(fd, -1, (int)syscall(SYS_userfaultfd, flags));
    if (fd != -1)
        return PyLong_FromLong(fd);
    if (PyErr_Occurred() || (errno != EPERM && errno != ENOSYS))
        return errno_error();
    err = errno;
    SYSCALL(dev, -1, open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
    if (dev == -1) {
        if (errno == ENOENT)
            errno = err;
        return errno_error();
    }
    SYSCALL(fd, -1, ioctl(dev, USERFAULTFD_IOC_NEW, flags));
    err = errno;
    (void)close(dev);
    errno = err;
    if (fd == -1)
        return errno_error();
    return PyLong_FromLong(fd);
}

PyDoc_STRVAR(uffd_api_doc,
"uffd_api($module, /, fd, features=0)\n--\n\n"
"ioctl(UFFDIO_API): the handshake (api=UFFD_API), enabling features (a\n"
"mask of UFFD_FEATURE_* bits).  Returns the kernel's uffdio_api.features\n"
"after the call (int): with features=0 all the features it supports.  A\n"
"userfaultfd takes one handshake only: probe on a throw-away fd.\n"
"Raises OSError (EINVAL for an unsupported feature or a second call).");

static PyObject *
vas_uffd_api(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "features", NULL};
    int fd, r;
    uint64_t features = 0;
    struct uffdio_api api;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|O&:uffd_api", kwlist,
                                     &fd, conv_u64, &features))
        return NULL;
    memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = features;
    SYSCALL(r, -1, ioctl(fd, UFFDIO_API, &api));
    if (r == -1)
        return errno_error();
    return PyLong_FromUnsignedLongLong(api.features);
}

PyDoc_STRVAR(uffd_register_doc,
"uffd_register($module, /, fd, address, length, mode)\n--\n\n"
"ioctl(UFFDIO_REGISTER): report faults in [address, address + length) on\n"
"fd.  address, length: bytes, multiples of PAGE_SIZE; mode:\n"
"UFFDIO_REGISTER_MODE_* bits.  Returns uffdio_register.ioctls, the mask of\n"
"1 << _UFFDIO_* ioctls usable on the range (int).\n"
"Raises ValueError('address must be a multiple of the page size' |\n"
"'length must be a positive multiple of the page size' |\n"
"'address + length overflows'), OSError.");

static PyObject *
vas_uffd_register(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "address", "length", "mode", NULL};
    int fd, r;
    uint64_t address, mode;
    Py_ssize_t length;
    struct uffdio_register reg;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&nO&:uffd_register", kwlist,
                                     &fd, conv_u64, &address, &length,
                                     conv_u64, &mode))
        return NULL;
    if (!check_range(address, length))
        return NULL;
    memset(&reg, 0, sizeof reg);
    reg.range.start = address;
    reg.range.len = (uint64_t)length;
    reg.mode = mode;
    SYSCALL(r, -1, ioctl(fd, UFFDIO_REGISTER, &reg));
    if (r == -1)
        return errno_error();
    return PyLong_FromUnsignedLongLong(reg.ioctls);
}

/* UFFDIO_UNREGISTER and UFFDIO_WAKE take a bare range. */
static PyObject *
range_ioctl(PyObject *args, PyObject *kw, const char *format,
            unsigned long request)
{
    static char *kwlist[] = {"fd", "address", "length", NULL};
    int fd, r;
    uint64_t address;
    Py_ssize_t length;
    struct uffdio_range range;

    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &fd, conv_u64,
                                     &address, &length))
        return NULL;
    if (!check_range(address, length))
        return NULL;
    range.start = address;
    range.len = (uint64_t)length;
    SYSCALL(r, -1, ioctl(fd, request, &range));
    if (r == -1)
        return errno_error();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(uffd_unregister_doc,
"uffd_unregister($module, /, fd, address, length)\n--\n\n"
"ioctl(UFFDIO_UNREGISTER): stop reporting faults in [address, address +\n"
"length).  address, length: bytes, multiples of PAGE_SIZE.  Returns None.\n"
"Raises ValueError (as uffd_register), OSError.");

static PyObject *
vas_uffd_unregister(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    return range_ioctl(args, kw, "iO&n:uffd_unregister", UFFDIO_UNREGISTER);
}

PyDoc_STRVAR(uffd_wake_doc,
"uffd_wake($module, /, fd, address, length)\n--\n\n"
"ioctl(UFFDIO_WAKE): wake the threads faulting in [address, address +\n"
"length) (after a *_MODE_DONTWAKE resolve).  address, length: bytes,\n"
"multiples of PAGE_SIZE.  Returns None.\n"
"Raises ValueError (as uffd_register), OSError.");

static PyObject *
vas_uffd_wake(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    return range_ioctl(args, kw, "iO&n:uffd_wake", UFFDIO_WAKE);
}

PyDoc_STRVAR(uffd_writeprotect_doc,
"uffd_writeprotect($module, /, fd, address, length, mode)\n--\n\n"
"ioctl(UFFDIO_WRITEPROTECT): with mode UFFDIO_WRITEPROTECT_MODE_WP,\n"
"write-protect [address, address + length), a range registered with\n"
"UFFDIO_REGISTER_MODE_WP, so that every later store there faults (pages\n"
"never touched too: a shmem mapping keeps a marker in their place); with\n"
"mode 0, lift the protection and wake the threads faulting there (unless\n"
"| UFFDIO_WRITEPROTECT_MODE_DONTWAKE).  It acts on the address space of the\n"
"process that created fd, whichever process calls it.  address, length:\n"
"bytes, multiples of PAGE_SIZE; mode: UFFDIO_WRITEPROTECT_MODE_* bits.\n"
"Returns None.  The GIL is released (a populated GiB takes ~0.1 s).\n"
"Raises ValueError (as uffd_register), OSError (ENOENT: part of the range\n"
"is not registered for write-protect, e.g. unmapped; ESRCH: the process\n"
"that created fd has exited).");

static PyObject *
vas_uffd_writeprotect(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "address", "length", "mode", NULL};
    int fd, r;
    uint64_t address, mode;
    Py_ssize_t length;
    struct uffdio_writeprotect wp;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&nO&:uffd_writeprotect",
                                     kwlist, &fd, conv_u64, &address, &length,
                                     conv_u64, &mode))
        return NULL;
    if (!check_range(address, length))
        return NULL;
    memset(&wp, 0, sizeof wp);
    wp.range.start = address;
    wp.range.len = (uint64_t)length;
    wp.mode = mode;
    SYSCALL(r, -1, ioctl(fd, UFFDIO_WRITEPROTECT, &wp));
    if (r == -1)
        return errno_error();
    Py_RETURN_NONE;
}

/*
 * Result of a resolving ioctl: `done` bytes.  A partial resolve fails with
 * EAGAIN; the bytes done go to BlockingIOError.characters_written.
 */
static PyObject *
resolve_result(int r, int64_t done)
{
    PyObject *args;

    if (r != -1)
        return PyLong_FromLongLong(done);
    if (PyErr_Occurred())
        return NULL;
    if (errno != EAGAIN || done <= 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    args = Py_BuildValue("(isL)", EAGAIN, strerror(EAGAIN), (long long)done);
    if (args != NULL) {
        PyErr_SetObject(PyExc_BlockingIOError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *
do_copy(int fd, uint64_t dst, uint64_t src, Py_ssize_t length, uint64_t mode)
{
    struct uffdio_copy copy;
    int r;

    memset(&copy, 0, sizeof copy);
    copy.dst = dst;
    copy.src = src;
    copy.len = (uint64_t)length;
    copy.mode = mode;
    SYSCALL(r, -1, ioctl(fd, UFFDIO_COPY, &copy));
    return resolve_result(r, copy.copy);
}

PyDoc_STRVAR(uffd_copy_doc,
"uffd_copy($module, /, fd, dst, src, mode=0)\n--\n\n"
"ioctl(UFFDIO_COPY): atomically fill the missing pages at dst with the\n"
"bytes of src and wake the threads faulting there.\n\n"
"dst: address, a multiple of PAGE_SIZE; src: contiguous bytes-like object,\n"
"its length a positive multiple of PAGE_SIZE; mode: UFFDIO_COPY_MODE_*\n"
"bits.  Returns the number of bytes copied (int).  The GIL is released.\n"
"Raises ValueError (as uffd_register), FileExistsError if a page is already\n"
"present, BlockingIOError on EAGAIN (retrying is the caller's job;\n"
"characters_written holds the bytes copied before it), OSError.");

static PyObject *
vas_uffd_copy(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "dst", "src", "mode", NULL};
    int fd;
    uint64_t dst, mode = 0;
    Py_buffer src;
    PyObject *res = NULL;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&y*|O&:uffd_copy", kwlist,
                                     &fd, conv_u64, &dst, &src, conv_u64,
                                     &mode))
        return NULL;
    if (check_range(dst, src.len))
        res = do_copy(fd, dst, (uint64_t)(uintptr_t)src.buf, src.len, mode);
    PyBuffer_Release(&src);
    return res;
}

PyDoc_STRVAR(uffd_copy_from_doc,
"uffd_copy_from($module, /, fd, dst, src_address, length, mode=0)\n--\n\n"
"ioctl(UFFDIO_COPY) from raw memory of this process: copy length bytes at\n"
"src_address (e.g. mapping.address + offset of the agent's own mapping of\n"
"the memfd; it must stay mapped during the call) to dst, as uffd_copy.\n\n"
"dst: address, a multiple of PAGE_SIZE; src_address: address; length:\n"
"bytes, a positive multiple of PAGE_SIZE; mode: UFFDIO_COPY_MODE_* bits.\n"
"Returns the number of bytes copied (int).  The GIL is released.\n"
"Raises ValueError (as uffd_register; 'address + length overflows' also\n"
"for src_address), FileExistsError, BlockingIOError, OSError (EFAULT for\n"
"an unmapped source).");

static PyObject *
vas_uffd_copy_from(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "dst", "src_address", "length", "mode",
                             NULL};
    int fd;
    uint64_t dst, src, mode = 0;
    Py_ssize_t length;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&O&n|O&:uffd_copy_from",
                                     kwlist, &fd, conv_u64, &dst, conv_u64,
                                     &src, &length, conv_u64, &mode))
        return NULL;
    if (!check_range(dst, length))
        return NULL;
    if (src > UINT64_MAX - (uint64_t)length)
        return value_error("address + length overflows");
    return do_copy(fd, dst, src, length, mode);
}

/*
 * UFFDIO_ZEROPAGE, UFFDIO_CONTINUE and UFFDIO_POISON take one layout: a
 * range, a mode, and the bytes resolved (zeropage / mapped / updated).
 */
struct uffdio_resolve {
    struct uffdio_range range;
    __u64 mode;
    __s64 done;
};
#define SAME_LAYOUT(type, field)                                         \
    _Static_assert(sizeof(struct type) == sizeof(struct uffdio_resolve) && \
                   offsetof(struct type, field) ==                       \
                   offsetof(struct uffdio_resolve, done), #type)
SAME_LAYOUT(uffdio_zeropage, zeropage);
SAME_LAYOUT(uffdio_continue, mapped);
SAME_LAYOUT(uffdio_poison, updated);
#undef SAME_LAYOUT

/* One resolving ioctl on [address, address + length) with mode. */
static PyObject *
resolving_ioctl(PyObject *args, PyObject *kw, const char *format,
                char **kwlist, unsigned long request)
{
    int fd, r;
    uint64_t address, mode = 0;
    Py_ssize_t length;
    struct uffdio_resolve res;

    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &fd, conv_u64,
                                     &address, &length, conv_u64, &mode))
        return NULL;
    if (!check_range(address, length))
        return NULL;
    memset(&res, 0, sizeof res);
    res.range.start = address;
    res.range.len = (uint64_t)length;
    res.mode = mode;
    SYSCALL(r, -1, ioctl(fd, request, &res));
    return resolve_result(r, res.done);
}

PyDoc_STRVAR(uffd_zeropage_doc,
"uffd_zeropage($module, /, fd, dst, length, mode=0)\n--\n\n"
"ioctl(UFFDIO_ZEROPAGE): fill the missing pages [dst, dst + length) with\n"
"zeros and wake the threads faulting there.  dst, length: bytes, multiples\n"
"of PAGE_SIZE; mode: UFFDIO_ZEROPAGE_MODE_* bits.  Returns the number of\n"
"bytes zeroed (int).  The GIL is released.\n"
"Raises ValueError (as uffd_register), FileExistsError, BlockingIOError,\n"
"OSError.");

static PyObject *
vas_uffd_zeropage(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "dst", "length", "mode", NULL};

    return resolving_ioctl(args, kw, "iO&n|O&:uffd_zeropage", kwlist,
                           UFFDIO_ZEROPAGE);
}

PyDoc_STRVAR(uffd_continue_doc,
"uffd_continue($module, /, fd, address, length, mode=0)\n--\n\n"
"ioctl(UFFDIO_CONTINUE): resolve minor faults in [address, address +\n"
"length) by mapping the pages already in the page cache, and wake the\n"
"threads faulting there.  address, length: bytes, multiples of PAGE_SIZE;\n"
"mode: UFFDIO_CONTINUE_MODE_* bits.  Returns the number of bytes mapped\n"
"(int).  The GIL is released.\n"
"Raises ValueError (as uffd_register), FileExistsError, BlockingIOError,\n"
"OSError.");

static PyObject *
vas_uffd_continue(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "address", "length", "mode", NULL};

    return resolving_ioctl(args, kw, "iO&n|O&:uffd_continue", kwlist,
                           UFFDIO_CONTINUE);
}

PyDoc_STRVAR(uffd_poison_doc,
"uffd_poison($module, /, fd, address, length, mode=0)\n--\n\n"
"ioctl(UFFDIO_POISON, Linux 6.6+): mark the unmapped pages of [address,\n"
"address + length) poisoned, so that touching one raises SIGBUS (and a\n"
"system call reading it fails with EFAULT), and wake the threads faulting\n"
"there.  address, length: bytes, multiples of PAGE_SIZE; mode:\n"
"UFFDIO_POISON_MODE_* bits.  Returns the number of bytes poisoned (int).\n"
"The GIL is released.\n"
"Raises ValueError (as uffd_register), FileExistsError if a page is\n"
"already mapped, BlockingIOError, OSError (EINVAL where the kernel lacks\n"
"it).");

static PyObject *
vas_uffd_poison(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "address", "length", "mode", NULL};

    return resolving_ioctl(args, kw, "iO&n|O&:uffd_poison", kwlist,
                           UFFDIO_POISON);
}

PyDoc_STRVAR(uffd_read_doc,
"uffd_read($module, /, fd, max_events=64)\n--\n\n"
"read(2) up to max_events struct uffd_msg from a userfaultfd.\n\n"
"Returns a list of (event, flags, address) tuples of ints: for\n"
"UFFD_EVENT_PAGEFAULT flags are UFFD_PAGEFAULT_FLAG_* bits and address is\n"
"the faulting address (rounded down to its page unless\n"
"UFFD_FEATURE_EXACT_ADDRESS); for other events flags and address are 0.\n"
"[] if the fd is non-blocking and nothing is pending.  The GIL is released\n"
"(a blocking fd waits for a fault).\n"
"Raises ValueError('max_events must be 1..4096'), OSError.");

/* Most events one uffd_read takes: its buffer (32 bytes each) is allocated per
 * call, so an unbounded count could ask for any amount of memory. */
#define UFFD_READ_MAX 4096

static PyObject *
vas_uffd_read(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "max_events", NULL};
    int fd;
    Py_ssize_t max_events = 64, n, count;
    struct uffd_msg *msgs;
    PyObject *list;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|n:uffd_read", kwlist, &fd,
                                     &max_events))
        return NULL;
    if (max_events <= 0 || max_events > UFFD_READ_MAX)
        return value_error("max_events must be 1..4096");
    msgs = PyMem_New(struct uffd_msg, (size_t)max_events);
    if (msgs == NULL)
        return PyErr_NoMemory();
    SYSCALL(n, -1,
            read(fd, msgs, (size_t)max_events * sizeof(struct uffd_msg)));
    if (n == -1) {
        if (errno == EAGAIN && !PyErr_Occurred()) {
            PyMem_Free(msgs);
            return PyList_New(0);
        }
        PyMem_Free(msgs);
        return errno_error();
    }
    count = n / (Py_ssize_t)sizeof(struct uffd_msg);
    list = PyList_New(count);
    for (Py_ssize_t i = 0; list != NULL && i < count; i++) {
        uint64_t flags = 0, address = 0;
        PyObject *item;

        if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
            flags = msgs[i].arg.pagefault.flags;
            address = msgs[i].arg.pagefault.address;
        }
        item = Py_BuildValue("(iKK)", (int)msgs[i].event,
                             (unsigned long long)flags,
                             (unsigned long long)address);
        if (item == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, item);
    }
    PyMem_Free(msgs);
    return list;
}

/* ------------------------------------------------------------------------ */
/* pagemap                                                                  */

PyDoc_STRVAR(pagemap_scan_doc,
"pagemap_scan($module, /, fd, start, end, category_mask, return_mask,\n"
"             flags=0, max_regions=1024)\n--\n\n"
"ioctl(PAGEMAP_SCAN, Linux 6.7+) on fd, an open /proc/PID/pagemap: the pages\n"
"of [start, end) of that process whose PAGE_IS_* categories include all of\n"
"category_mask, as regions of contiguous pages of equal categories.  With\n"
"flags PM_SCAN_WP_MATCHING the kernel write-protects the matching pages in\n"
"the same walk (their PTEs' uffd-wp bits, so the range must be registered\n"
"on a userfaultfd with UFFD_FEATURE_WP_ASYNC; PM_SCAN_CHECK_WPASYNC fails\n"
"with EPERM instead of walking a range that is not).  A page written after\n"
"the walk protected it is reported by the next scan.\n\n"
"start, end: addresses, multiples of PAGE_SIZE, start <= end; return_mask:\n"
"the category bits reported per region; max_regions: 1..65536, the most\n"
"regions one call returns (the walk stops early when they are used up).\n"
"Returns (regions, walk_end): a list of (start, end, categories) tuples of\n"
"ints and the address the walk reached (end when it was complete; call\n"
"again from walk_end otherwise).  The GIL is released (a GiB of\n"
"populated pages takes ~1 ms to scan, ~10 ms when most are written).\n"
"Raises ValueError('start and end must be multiples of the page size and\n"
"start <= end', 'max_regions must be 1..65536'), OSError (EINVAL where the\n"
"kernel lacks PAGEMAP_SCAN, EPERM for PM_SCAN_CHECK_WPASYNC on a range not\n"
"registered with UFFD_FEATURE_WP_ASYNC).");

/* Most regions one pagemap_scan returns: its buffer (24 bytes each) is
 * allocated per call. */
#define PAGEMAP_SCAN_MAX 65536

static PyObject *
vas_pagemap_scan(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "start", "end", "category_mask",
                             "return_mask", "flags", "max_regions", NULL};
    int fd;
    long n;
    uint64_t start, end, category_mask, return_mask, flags = 0;
    Py_ssize_t max_regions = 1024;
    struct pm_scan_arg arg;
    struct page_region *regions;
    PyObject *list;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&O&O&O&|O&n:pagemap_scan",
                                     kwlist, &fd, conv_u64, &start, conv_u64,
                                     &end, conv_u64, &category_mask, conv_u64,
                                     &return_mask, conv_u64, &flags,
                                     &max_regions))
        return NULL;
    if (!page_aligned(start) || !page_aligned(end) || start > end)
        return value_error("start and end must be multiples of the page size "
                           "and start <= end");
    if (max_regions <= 0 || max_regions > PAGEMAP_SCAN_MAX)
        return value_error("max_regions must be 1..65536");
    regions = PyMem_New(struct page_region, (size_t)max_regions);
    if (regions == NULL)
        return PyErr_NoMemory();
    memset(&arg, 0, sizeof arg);
    arg.size = sizeof arg;
    arg.flags = flags;
    arg.start = start;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)regions;
    arg.vec_len = (uint64_t)max_regions;
    arg.category_mask = category_mask;
    arg.return_mask = return_mask;
    SYSCALL(n, -1, ioctl(fd, PAGEMAP_SCAN, &arg));
    if (n == -1) {
        PyMem_Free(regions);
        return errno_error();
    }
    list = PyList_New(n);
    for (long i = 0; list != NULL && i < n; i++) {
        PyObject *item = Py_BuildValue(
            "(KKK)", (unsigned long long)regions[i].start,
            (unsigned long long)regions[i].end,
            (unsigned long long)regions[i].categories);
        if (item == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, item);
    }
    PyMem_Free(regions);
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(NK)", list, (unsigned long long)arg.walk_end);
}

/* ------------------------------------------------------------------------ */
/* module                                                                   */

#define KW_METH(name) \
    {#name, (PyCFunction)(void (*)(void))vas_##name, \
     METH_VARARGS | METH_KEYWORDS, name##_doc}

static PyMethodDef vas_methods[] = {
    KW_METH(memfd_create),
    KW_METH(fallocate),
    KW_METH(ftruncate),
    KW_METH(mmap),
    {"chunk_hashes", (PyCFunction)vas_chunk_hashes, METH_VARARGS,
     chunk_hashes_doc},
    KW_METH(userfaultfd),
    KW_METH(uffd_api),
    KW_METH(uffd_register),
    KW_METH(uffd_unregister),
    KW_METH(uffd_copy),
    KW_METH(uffd_copy_from),
    KW_METH(uffd_zeropage),
    KW_METH(uffd_continue),
    KW_METH(uffd_poison),
    KW_METH(uffd_wake),
    KW_METH(uffd_writeprotect),
    KW_METH(uffd_read),
    KW_METH(pagemap_scan),
    KW_METH(process_vm_readv),
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(vas_doc,
"Thin, checked wrappers of the Linux syscalls vas needs: memfds, shared\n"
"mappings, chunk hashing, userfaultfd, pagemap scans and process_vm_readv.\n"
"No policy lives here.");

static struct PyModuleDef vas_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vas._native",
    .m_doc = vas_doc,
    .m_size = -1,
    .m_methods = vas_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *m;
    long ps = sysconf(_SC_PAGESIZE);

    if (ps <= 0 || (ps & (ps - 1)) != 0) {
        PyErr_SetString(PyExc_ImportError, "sysconf(_SC_PAGESIZE) failed");
        return NULL;
    }
    page_size = (size_t)ps;
    if (PyType_Ready(&MappingType) < 0)
        return NULL;
    m = PyModule_Create(&vas_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Mapping", (PyObject *)&MappingType) < 0)
        goto fail;
#define ADD_INT(name, value) \
    if (PyModule_AddIntConstant(m, name, (long)(value)) < 0) goto fail
    ADD_INT("PAGE_SIZE", ps);
    ADD_INT("MADV_NORMAL", MADV_NORMAL);
    ADD_INT("MADV_SEQUENTIAL", MADV_SEQUENTIAL);
    ADD_INT("MADV_WILLNEED", MADV_WILLNEED);
    ADD_INT("MADV_DONTNEED", MADV_DONTNEED);
    ADD_INT("MADV_REMOVE", MADV_REMOVE);
    ADD_INT("MADV_POPULATE_READ", MADV_POPULATE_READ);
    ADD_INT("MADV_POPULATE_WRITE", MADV_POPULATE_WRITE);
    ADD_INT("FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
    ADD_INT("FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
    ADD_INT("MFD_CLOEXEC", MFD_CLOEXEC);
    ADD_INT("MFD_ALLOW_SEALING", MFD_ALLOW_SEALING);
    ADD_INT("UFFDIO_REGISTER_MODE_MISSING", UFFDIO_REGISTER_MODE_MISSING);
    ADD_INT("UFFDIO_REGISTER_MODE_WP", UFFDIO_REGISTER_MODE_WP);
    ADD_INT("UFFDIO_REGISTER_MODE_MINOR", UFFDIO_REGISTER_MODE_MINOR);
    ADD_INT("UFFD_FEATURE_MISSING_SHMEM", UFFD_FEATURE_MISSING_SHMEM);
    ADD_INT("UFFD_FEATURE_MINOR_SHMEM", UFFD_FEATURE_MINOR_SHMEM);
    ADD_INT("UFFD_FEATURE_POISON", UFFD_FEATURE_POISON);
    ADD_INT("UFFD_FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS);
    ADD_INT("UFFD_FEATURE_WP_HUGETLBFS_SHMEM", UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
    ADD_INT("UFFD_FEATURE_WP_ASYNC", UFFD_FEATURE_WP_ASYNC);
    ADD_INT("UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY);
    ADD_INT("PAGE_IS_WRITTEN", PAGE_IS_WRITTEN);
    ADD_INT("PM_SCAN_WP_MATCHING", PM_SCAN_WP_MATCHING);
    ADD_INT("PM_SCAN_CHECK_WPASYNC", PM_SCAN_CHECK_WPASYNC);
    ADD_INT("UFFDIO_WRITEPROTECT_MODE_WP", UFFDIO_WRITEPROTECT_MODE_WP);
    ADD_INT("UFFDIO_WRITEPROTECT_MODE_DONTWAKE", UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
    ADD_INT("UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT);
    ADD_INT("UFFD_PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE);
    ADD_INT("UFFD_PAGEFAULT_FLAG_MINOR", UFFD_PAGEFAULT_FLAG_MINOR);
#undef ADD_INT
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
