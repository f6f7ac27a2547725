//! [`namespaced_resource!`](crate::namespaced_resource): `kube::Resource` for the lean types that
//! components decode instead of k8s-openapi's full ones (only the fields they read, so that tens
//! of thousands of objects stay small in memory).

/// Implements `kube::Resource` for a namespaced type with a `metadata: ObjectMeta` field, of a
/// fixed group, version, kind and plural: `namespaced_resource!(Type, "group", "v1", "Kind",
/// "kinds")` (the core group is `""`).
#[macro_export]
macro_rules! namespaced_resource {
    ($type:ty, $group:literal, $version:literal, $kind:literal, $plural:literal) => {
        impl ::kube::Resource for $type {
            type DynamicType = ();
            type Scope = ::kube::core::NamespaceResourceScope;

            fn kind((): &()) -> ::std::borrow::Cow<'_, str> {
                ::std::borrow::Cow::Borrowed($kind)
            }
            fn group((): &()) -> ::std::borrow::Cow<'_, str> {
                ::std::borrow::Cow::Borrowed($group)
            }
            fn version((): &()) -> ::std::borrow::Cow<'_, str> {
                ::std::borrow::Cow::Borrowed($version)
            }
            fn plural((): &()) -> ::std::borrow::Cow<'_, str> {
                ::std::borrow::Cow::Borrowed($plural)
            }
            fn meta(&self) -> &::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(
                &mut self,
            ) -> &mut ::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
