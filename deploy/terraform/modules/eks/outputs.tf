output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "URL of the Kubernetes API server."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA certificate of the API server."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "cluster_version" {
  description = "Kubernetes version of the control plane."
  value       = aws_eks_cluster.this.version
}

output "cluster_security_group_id" {
  description = "Security group EKS created for the control plane and the managed nodes."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider of the cluster (the Federated principal of IRSA trust policies)."
  value       = aws_iam_openid_connect_provider.this.arn
}

output "oidc_issuer" {
  description = "Issuer of the cluster's service-account tokens without https:// (the condition key prefix of IRSA trust policies)."
  value       = local.oidc_issuer
}

output "node_role_arn" {
  description = "IAM role of the nodes of both node groups."
  value       = aws_iam_role.node.arn
}

output "node_pool_label" {
  description = "Label key that names a node's pool (cpu or gpu): pods select a pool with it."
  value       = "visionloop.dev/node-pool"
}

output "cpu_node_group_name" {
  description = "Name of the CPU managed node group."
  value       = aws_eks_node_group.cpu.node_group_name
}

output "gpu_node_group_name" {
  description = "Name of the GPU managed node group."
  value       = aws_eks_node_group.gpu.node_group_name
}

output "gpu_taint" {
  description = "Taint of the GPU nodes (key, value, effect as the EKS API spells it); GPU pods tolerate it."
  value       = tolist(aws_eks_node_group.gpu.taint)[0]
}
