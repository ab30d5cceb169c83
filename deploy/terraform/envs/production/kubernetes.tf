# Everything that talks to the cluster's Kubernetes API (helm and kubernetes providers) is in this file
# and nowhere else: the test validates the rest of this root with the AWS provider alone (the only one
# that can be installed offline) by leaving this file out.

# The kubernetes and helm providers talk to the cluster this configuration creates. They authenticate
# the way kubectl does after `aws eks update-kubeconfig`: a short-lived token from `aws eks get-token`
# (the AWS CLI must be on PATH), so no credential is stored in the state.
provider "kubernetes" {
  host                   = module.eks.cluster_endpoint
  cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)

  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
  }
}

provider "helm" {
  kubernetes {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)

    exec {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
    }
  }
}

module "nvidia_device_plugin" {
  source = "../../modules/nvidia-device-plugin"
  # Bottlerocket's NVIDIA variant runs its own device plugin
  count = var.gpu_ami_type == "AL2023_x86_64_NVIDIA" ? 1 : 0

  chart_version = var.nvidia_device_plugin_version

  depends_on = [module.eks]
}

# EKS (1.30+) ships gp2 without the default-class annotation: a PersistentVolumeClaim without a class
# (PostgreSQL, MLflow, the training checkpoints) gets this encrypted gp3 class, provisioned by the EBS
# CSI add-on in the zone its pod is scheduled to.
resource "kubernetes_storage_class_v1" "gp3" {
  metadata {
    name = "gp3"
    annotations = {
      "storageclass.kubernetes.io/is-default-class" = "true"
    }
  }

  storage_provisioner    = "ebs.csi.aws.com"
  reclaim_policy         = "Delete"
  volume_binding_mode    = "WaitForFirstConsumer"
  allow_volume_expansion = true
  parameters = {
    type      = "gp3"
    encrypted = "true"
  }

  depends_on = [module.eks]
}
