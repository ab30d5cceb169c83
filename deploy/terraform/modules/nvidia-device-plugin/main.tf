# NVIDIA's device plugin advertises each node's GPUs as the nvidia.com/gpu resource, which the training
# Job and the PyTorchJob request. The EKS AL2023 NVIDIA AMI brings the driver and the container toolkit
# but not this plugin. (Bottlerocket's NVIDIA variant runs its own: envs/production installs this module
# only for AL2023_x86_64_NVIDIA.)
#
# Chart: https://nvidia.github.io/k8s-device-plugin (source https://github.com/NVIDIA/k8s-device-plugin),
# chart nvidia-device-plugin, version var.chart_version (0.17.1 by default).

resource "helm_release" "this" {
  name       = "nvidia-device-plugin"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.chart_version
  namespace  = var.namespace

  atomic          = true
  cleanup_on_fail = true
  # with the GPU group at 0 nodes the DaemonSet has no pod to wait for, so waiting costs nothing
  wait = true

  values = [yamlencode({
    nodeSelector = var.node_selector
    tolerations  = var.tolerations
    # the chart's default affinity wants labels from node-feature-discovery, which this cluster does not
    # run; select the GPU pool by its own label instead (a list replaces the chart's terms)
    affinity = {
      nodeAffinity = {
        requiredDuringSchedulingIgnoredDuringExecution = {
          nodeSelectorTerms = [{
            matchExpressions = [for key, value in var.node_selector : { key = key, operator = "In", values = [value] }]
          }]
        }
      }
    }
    gfd = { enabled = false }
  })]
}
