/*
 * btl/ivcom: the file Open MPI loads, mca_btl_ivcom.so.
 *
 * Open MPI checks only the MCA base version and the names of a component
 * it loads, not the release series it was built for, and the BTL structs
 * differ between series (4.1: BTL 3.1.0, 5.0: BTL 3.3.0). So this small
 * object stands in front of the implementation (ivcom_btl_impl.so, beside
 * it). It references nothing of Open MPI (only libc), so it loads into any
 * series; the generic part of the component struct that Open MPI reads
 * first (mca_base_component_t, MCA 2.1.0) is the same in 4.1 and 5.0. Its
 * register function, the first call Open MPI makes, checks that the
 * process runs the libopen-pal this build was linked against (the soname
 * differs per series: .40 for 4.x, .80 for 5.x). If not, it prints why and
 * fails, and Open MPI drops the component. If so, it loads the
 * implementation and hands every later call to it.
 *
 * Built with IVCOM_OPAL_SONAME (libopen-pal's soname at build time) and
 * IVCOM_IMPL_NAME (the implementation's file name).
 */
#include "opal_config.h"

#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "opal/mca/btl/btl.h"

#include "btl_ivcom_compat.h"

#ifndef IVCOM_OPAL_SONAME
#    error "IVCOM_OPAL_SONAME (libopen-pal's soname) must be defined by the build"
#endif
#ifndef IVCOM_IMPL_NAME
#    define IVCOM_IMPL_NAME "ivcom_btl_impl.so"
#endif

/* Entry point of the implementation: its component, if it was built
 * against the same Open MPI release as this loader. */
typedef mca_btl_base_component_t *(*ivcom_impl_entry_fn)(const char *built_for);

static int ivcom_loader_register(void);

__attribute__((visibility("default"))) mca_btl_base_component_t mca_btl_ivcom_component = {
    .btl_version = {
        MCA_BTL_DEFAULT_VERSION("ivcom"),
        .mca_register_component_params = ivcom_loader_register,
    },
    .btl_data = {
        .param_field = MCA_BASE_METADATA_PARAM_NONE,
    },
};

/* Directory of this file (for the implementation beside it). */
static int self_dir(char *buf, size_t len)
{
    Dl_info info;
    const char *slash;
    if (!dladdr((void *) &mca_btl_ivcom_component, &info) || NULL == info.dli_fname
        || NULL == (slash = strrchr(info.dli_fname, '/'))) {
        snprintf(buf, len, ".");
        return 0;
    }
    snprintf(buf, len, "%.*s", (int) (slash - info.dli_fname), info.dli_fname);
    return 1;
}

/* The libopen-pal loaded in this process (file name), for the message. */
static int find_opal(struct dl_phdr_info *info, size_t size, void *data)
{
    const char *base = info->dlpi_name ? strrchr(info->dlpi_name, '/') : NULL;
    (void) size;
    base = base ? base + 1 : info->dlpi_name;
    if (base && 0 == strncmp(base, "libopen-pal.so", 14)) {
        snprintf((char *) data, 256, "%s", info->dlpi_name);
        return 1;
    }
    return 0;
}

static const char *series_of(const char *path)
{
    if (strstr(path, "libopen-pal.so.40")) {
        return "Open MPI 4.x (libopen-pal.so.40)";
    }
    if (strstr(path, "libopen-pal.so.80")) {
        return "Open MPI 5.x (libopen-pal.so.80)";
    }
    return path;
}

static void refuse(const char *what, const char *detail)
{
    char dir[4096], host[256] = "?";
    self_dir(dir, sizeof(dir));
    gethostname(host, sizeof(host) - 1);
    fprintf(stderr,
            "--------------------------------------------------------------------------\n"
            "btl/ivcom: %s\n\n"
            "  Component: %s/mca_btl_ivcom.so\n"
            "  Built for: Open MPI %s (%s)\n"
            "  Found:     %s\n"
            "  Host:      %s (pid %d)\n\n"
            "The ivcom BTL is not loaded in this process. Install the ivcom build for\n"
            "this Open MPI (the openmpi-btl-ivcom package of this Debian release), or\n"
            "build it against this Open MPI's headers (scripts/build).\n"
            "--------------------------------------------------------------------------\n",
            what, dir, IVCOM_BUILT_FOR, IVCOM_OPAL_SONAME, detail, host, (int) getpid());
}

static int ivcom_loader_register(void)
{
    char path[4352], found[256] = "no libopen-pal in this process";
    void *opal, *impl;
    ivcom_impl_entry_fn entry;
    mca_btl_base_component_t *real;

    /* 1. The process must run the Open MPI series this build is for. */
    opal = dlopen(IVCOM_OPAL_SONAME, RTLD_LAZY | RTLD_NOLOAD);
    if (NULL == opal) {
        dl_iterate_phdr(find_opal, found);
        refuse("this build is for another Open MPI release series.", series_of(found));
        return OPAL_ERROR;
    }
    dlclose(opal);

    /* 2. The implementation beside this file, built in the same build. */
    self_dir(path, sizeof(path));
    strncat(path, "/" IVCOM_IMPL_NAME, sizeof(path) - strlen(path) - 1);
    impl = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (NULL == impl) {
        refuse("cannot load its implementation.", dlerror());
        return OPAL_ERROR;
    }
    entry = (ivcom_impl_entry_fn) dlsym(impl, "mca_btl_ivcom_impl");
    real = entry ? entry(IVCOM_BUILT_FOR) : NULL;
    if (NULL == real) {
        snprintf(found, sizeof(found), "%s of another build", path);
        refuse("its implementation does not match it.", found);
        return OPAL_ERROR;
    }

    /* 3. From now on Open MPI calls the implementation directly. */
    mca_btl_ivcom_component.btl_version.mca_open_component = real->btl_version.mca_open_component;
    mca_btl_ivcom_component.btl_version.mca_close_component = real->btl_version.mca_close_component;
    mca_btl_ivcom_component.btl_version.mca_query_component = real->btl_version.mca_query_component;
    mca_btl_ivcom_component.btl_init = real->btl_init;
    mca_btl_ivcom_component.btl_progress = real->btl_progress;
    return real->btl_version.mca_register_component_params();
}
