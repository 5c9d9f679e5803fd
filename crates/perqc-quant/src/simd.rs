//! Runtime CPU dispatch for the vectorizable loops.

/// Defines `$name(args)` whose `$body` is compiled three times: for AVX-512F (with AVX2 and
/// FMA), for AVX2+FMA and for the baseline target, and picks the widest the CPU has. The
/// copies evaluate the same expressions (Rust never contracts `a * b + c` into an FMA), so
/// element-wise results agree bit for bit; only sums over lanes may round differently.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the features were just detected.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the features were just detected.
                    return unsafe { fast($($arg),*) };
                }
            }
            #[inline(always)]
            fn base($($arg: $ty),*) $(-> $ret)? $body
            base($($arg),*)
        }
    };
}
pub(crate) use multiversion;
